"""Kernel providers: which implementation runs each op of the kernel seam.

A family (a subpackage of vllm_kunlun.ops: norm, activation, rotary, kv_cache, attention, ...)
declares its ops in its `__init__.py` and implements them in one module per provider:

- `reference.py`: plain PyTorch, the specification; every family has one, defining every op;
- `compiled.py`: the emulated device's fast path (optional; ops it leaves out run the
  reference, which is the emulated device's kernel too);
- `kunlun.py`: the binding to the Kunlun kernel library `kunlun_ops`; every family has one,
  defining every op (an op without a recorded Kunlun kernel names the reference explicitly).

A provider module may define `prepare()`: building kernels, or checking the installed library's
API. Families are found by looking at the package, so a new family joins every provider,
`check-kernels` and the signature tests without a list to edit.
"""

import functools
import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from vllm_kunlun import envs
from vllm_kunlun.log import get_logger
from vllm_kunlun.ops.declare import DECLARED, OpSpec

logger = get_logger("ops")

PROVIDERS: dict[str, str] = {
    "reference": "reference kernels (plain PyTorch)",
    "compiled": "the emulated device's fast kernels (C++; oneDNN-packed GEMMs for the MoE experts; "
    "torch._int_mm for int8 GEMMs) where they exist, reference kernels elsewhere",
    "kunlun": "Kunlun kernel library (kunlun_ops)",
}
#: Values VLLM_KUNLUN_KERNELS accepts.
KERNEL_CHOICES = ("auto", *PROVIDERS)
#: Providers that must implement every op of every family themselves.
COMPLETE_PROVIDERS = ("reference", "kunlun")


@functools.cache
def families() -> tuple[str, ...]:
    """The op families (subpackages with a reference.py), imported so their ops are declared."""
    here = Path(__file__).parent
    found = []
    for info in pkgutil.iter_modules([str(here)]):
        if info.ispkg and (here / info.name / "reference.py").exists():
            importlib.import_module(f"{__package__}.{info.name}")
            found.append(info.name)
    return tuple(sorted(found))


def declared_ops() -> dict[str, OpSpec]:
    """Every op of every family, by name."""
    families()
    return dict(DECLARED)


def ops_of(family: str) -> list[str]:
    return [spec.name for spec in declared_ops().values() if spec.family == family]


def _family_module(family: str, provider: str) -> ModuleType | None:
    name = f"{__package__}.{family}.{provider}"
    if importlib.util.find_spec(name) is None:
        return None
    return importlib.import_module(name)


class Provider:
    """The kernels of one provider for every declared op, resolved once."""

    def __init__(self, name: str) -> None:
        if name not in PROVIDERS:
            raise ValueError(f"unknown kernel provider {name!r}; one of {', '.join(PROVIDERS)}")
        self.name = name
        self.description = PROVIDERS[name]
        self.kernels: dict[str, Callable] = {}
        #: For each op, the module whose kernel runs ("attention.compiled", "norm.reference").
        self.sources: dict[str, str] = {}
        self._prepare_steps: list[Callable[[], None]] = []
        self._prepared = False
        for family in families():
            self._add_family(family)

    def _add_family(self, family: str) -> None:
        reference = _family_module(family, "reference")
        module = _family_module(family, self.name)
        if module is None and self.name in COMPLETE_PROVIDERS:
            raise RuntimeError(f"op family {family!r} has no {self.name}.py")
        for op in ops_of(family):
            kernel = getattr(module, op, None) if module is not None else None
            if kernel is None and self.name in COMPLETE_PROVIDERS:
                raise RuntimeError(f"{family}/{self.name}.py does not define the op {op!r}")
            if kernel is None or kernel is getattr(reference, op):
                kernel, source = getattr(reference, op), f"{family}.reference"
            else:
                source = f"{family}.{self.name}"
            self.kernels[op] = kernel
            self.sources[op] = source
        prepare = getattr(module, "prepare", None) if module is not None else None
        if prepare is not None:
            self._prepare_steps.append(prepare)

    def prepare(self) -> "Provider":
        """Build or check what the kernels need (once); returns self."""
        if not self._prepared:
            for step in self._prepare_steps:
                step()
            self._prepared = True
        return self

    def kernel(self, op: str) -> Callable:
        return self.kernels[op]

    def __getattr__(self, op: str) -> Callable:
        kernels = self.__dict__.get("kernels", {})
        if op in kernels:
            return kernels[op]
        raise AttributeError(op)


def kunlun_library_available() -> bool:
    return importlib.util.find_spec("kunlun_ops") is not None


def compiler_available() -> bool:
    from vllm_kunlun.ops.build import compiler_available as available

    return available()


def choose_provider(choice: str | None = None) -> Provider:
    """The provider `choice` (default: VLLM_KUNLUN_KERNELS) asks for; see vllm_kunlun.envs.

    The Kunlun provider is checked against the installed library here; the compiled provider
    builds its kernels only when prepared (current_provider, at worker start).
    """
    if choice is None:
        choice = envs.VLLM_KUNLUN_KERNELS.get()
    choice = choice.strip().lower()
    if choice not in KERNEL_CHOICES:
        raise ValueError(
            f"VLLM_KUNLUN_KERNELS={choice!r} is not one of {', '.join(KERNEL_CHOICES)}."
        )
    if choice == "kunlun" or (choice == "auto" and kunlun_library_available()):
        from vllm_kunlun.ops.kunlun_library import library

        library()  # a clear error first when it does not import
        return Provider("kunlun").prepare()
    if choice == "reference":
        return Provider("reference")
    if compiler_available():
        return Provider("compiled")
    if choice == "compiled":
        raise RuntimeError(
            "VLLM_KUNLUN_KERNELS=compiled needs a C++ compiler (`c++` on PATH) to build the "
            "emulated device's kernels; install one (e.g. apt-get install g++) or set "
            "VLLM_KUNLUN_KERNELS=reference."
        )
    logger.warning("vllm-kunlun: no C++ compiler found, so the emulated device runs the "
                   "reference kernels only (slower); install g++ to compile "
                   "them, or set VLLM_KUNLUN_KERNELS=reference to silence this.")  # fmt: skip
    return Provider("reference")


@functools.cache
def current_provider() -> Provider:
    provider = choose_provider()
    logger.info("vllm-kunlun kernel provider: %s", provider.description)
    return provider.prepare()
