"""The Kunlun kernel library `kunlun_ops`, as the families' bindings (`<family>/kunlun.py`) see it.

Needs a Kunlun XPU with `kunlun_ops` installed; never run on one. Every binding is verified only
by contract tests against the stand-in library in tests/standin (KUNLUN.md: call sites of the
public baidu/vLLM-Kunlun plugin, kunlun_ops 0.1.58). What this module gives the bindings:

- `library()`: the imported module (a clear error when it does not import);
- signature probing (`accepts`, `parameter_names`): the library's functions are ordinary Python
  callables with introspectable signatures (KUNLUN.md C6), and recorded call sites disagree on
  some of them (§4.1), so bindings check the installed build when the provider loads;
- `check_keywords`: refuse a build whose API differs from the recorded one, naming what differs;
- `dense` / `write_back`: kernels read raw pointers and ignore strides (C1), so non-contiguous
  tensors are copied in and results copied back.
"""

import importlib
import inspect
import math
import sys
from collections.abc import Callable, Mapping
from types import ModuleType

import torch

RECORDED_BUILD = "kunlun_ops 0.1.58"


def library() -> ModuleType:
    """`import kunlun_ops`, or a RuntimeError that says what to install."""
    module = sys.modules.get("kunlun_ops")
    if module is not None:
        return module
    try:
        return importlib.import_module("kunlun_ops")
    except (ImportError, OSError) as error:
        raise RuntimeError(
            f"vllm-kunlun's Kunlun kernel provider needs the Kunlun kernel library kunlun_ops, "
            f"and `import kunlun_ops` failed: {error!r}. Install the kunlun_ops wheel that "
            f"matches your XRE and xpytorch ({RECORDED_BUILD} is the recorded build), or set "
            "VLLM_KUNLUN_KERNELS=reference to run the reference kernels instead."
        ) from error


def function(name: str) -> Callable:
    fn = getattr(library(), name, None)
    if not callable(fn):
        raise RuntimeError(f"kunlun_ops.{name} is missing; vllm-kunlun needs it.")
    return fn


def parameters(fn: Callable) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as error:
        raise RuntimeError(
            f"vllm-kunlun cannot read the signature of kunlun_ops function {fn!r} ({error}); "
            "the binding needs introspectable kunlun_ops functions (KUNLUN.md C6)."
        ) from None


def accepts(fn: Callable, keyword: str) -> bool:
    for p in parameters(fn):
        if p.kind == p.VAR_KEYWORD or (p.name == keyword and p.kind != p.POSITIONAL_ONLY):
            return True
    return False


def positional_names(fn: Callable) -> list[str]:
    return [p.name for p in parameters(fn) if p.kind != p.KEYWORD_ONLY]


def check_keywords(expected: Mapping[str, tuple[str, ...]]) -> None:
    """Every function in `expected` exists and accepts the keywords the binding passes."""
    problems = []
    for name, keywords in expected.items():
        fn = getattr(library(), name, None)
        if fn is None:
            problems.append(f"kunlun_ops.{name} is missing")
            continue
        missing = [k for k in keywords if not accepts(fn, k)]
        if missing:
            problems.append(f"kunlun_ops.{name} does not accept {', '.join(missing)}")
    if problems:
        raise RuntimeError(
            "The installed kunlun_ops does not match the API vllm-kunlun was written against "
            f"({RECORDED_BUILD}, KUNLUN.md §2): {'; '.join(problems)}."
        )


def dense(t: torch.Tensor) -> torch.Tensor:
    """Kunlun kernels read raw pointers (KUNLUN.md C1): hand them contiguous memory."""
    return t if t.is_contiguous() else t.contiguous()


def int32(t: torch.Tensor) -> torch.Tensor:
    """Lengths, lods and block tables as the kernels read them: contiguous int32 (C1, C5)."""
    return dense(t.to(torch.int32))


def attention_alpha(scale: float, head_size: int) -> float:
    """The attention kernels scale scores by 1/sqrt(head_dim) themselves, then by alpha (§2d,
    inferred): the alpha that gives softmax scale `scale`."""
    return scale * math.sqrt(head_size)


def write_back(dst: torch.Tensor, src: torch.Tensor) -> None:
    """After a kernel wrote `src` (a contiguous stand-in for `dst`), update `dst` if needed."""
    if src is not dst:
        dst.copy_(src.view(dst.shape))
