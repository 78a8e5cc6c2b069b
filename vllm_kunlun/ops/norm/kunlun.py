"""Kunlun binding of the norm family (KUNLUN.md §2a). Needs a Kunlun XPU; contract-tested only.

- rmsnorm / add_rmsnorm: call sites disagree on the signatures (§4.1), so `prepare` probes
  them and picks the active form (x, weight, output, eps) / keyword add_rmsnorm, or the legacy
  form (x, weight, eps, out=) / (x, residual, weight, eps, out=). The legacy callers cast the
  weight to float32, the active ones pass the model dtype (§4.2: which is right is unknown).
- add_rmsnorm aliasing (§4.3): the active form passes output=x and residual_output=residual, as
  the recorded plugin does; that this is safe for every shape and dtype is assumed.
- gemma_rmsnorm / gemma_add_rmsnorm take the raw w and apply (1 + w) themselves; the recorded
  Gemma caller gives gemma_add_rmsnorm fresh output tensors rather than aliases, so this binding
  does too and copies them back.
"""

import torch

from vllm_kunlun.log import get_logger
from vllm_kunlun.ops.kunlun_library import (
    accepts,
    check_keywords,
    dense,
    function,
    library,
    positional_names,
    write_back,
)

logger = get_logger("ops")

ACTIVE = "active"
LEGACY = "legacy"
KEYWORDS = {
    "gemma_add_rmsnorm": ("weight", "output", "eps", "residual_output"),
}
FORM_KEYWORDS = {
    ("add_rmsnorm", ACTIVE): ("residual_output", "weight", "eps", "output"),
    ("add_rmsnorm", LEGACY): ("out",),
    ("rmsnorm", LEGACY): ("out",),
}
#: The forms `prepare` found in the installed build.
forms: dict[str, str] = {}


def _eps_position(fn) -> int | None:
    names = positional_names(fn)
    return next((i for i, name in enumerate(names) if name.startswith("eps")), None)


def rmsnorm_form(fn) -> str:
    """Active (x, weight, output, eps) or legacy (x, weight, eps, out=): told apart by eps."""
    position = _eps_position(fn)
    if position == 3:
        return ACTIVE
    if position == 2 and accepts(fn, "out"):
        return LEGACY
    raise RuntimeError(
        f"kunlun_ops.rmsnorm{positional_names(fn)} matches neither recorded form, "
        "(x, weight, output, eps) nor (x, weight, eps, out=); update vllm_kunlun/ops/norm/"
        "kunlun.py for this kunlun_ops build."
    )


def add_rmsnorm_form(fn) -> str:
    """Active: keywords residual_output=, weight=, eps=, output=; legacy: (x, r, w, eps, out=)."""
    if all(accepts(fn, k) for k in FORM_KEYWORDS["add_rmsnorm", ACTIVE]):
        return ACTIVE
    if _eps_position(fn) == 3 and accepts(fn, "out"):
        return LEGACY
    raise RuntimeError(
        f"kunlun_ops.add_rmsnorm{positional_names(fn)} matches neither recorded form, "
        "(x, residual, residual_output=, weight=, eps=, output=) nor "
        "(x, residual, weight, eps, out=); update vllm_kunlun/ops/norm/kunlun.py."
    )


def prepare() -> None:
    found = {
        "rmsnorm": rmsnorm_form(function("rmsnorm")),
        "add_rmsnorm": add_rmsnorm_form(function("add_rmsnorm")),
    }
    expected = dict(KEYWORDS)
    for name, form in found.items():
        expected[name] = FORM_KEYWORDS.get((name, form), ())
    function("gemma_rmsnorm")
    check_keywords(expected)
    forms.clear()
    forms.update(found)
    logger.info(
        "kunlun_ops %s (%s): rmsnorm uses the %s form, add_rmsnorm the %s form",
        getattr(library(), "__version__", "version unknown"),
        getattr(library(), "__file__", "?"),
        forms["rmsnorm"],
        forms["add_rmsnorm"],
    )


def _weight(weight: torch.Tensor, form: str) -> torch.Tensor:
    return dense(weight.float() if form == LEGACY else weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = dense(x)
    output = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    w = _weight(weight, forms["rmsnorm"])
    if forms["rmsnorm"] == ACTIVE:
        library().rmsnorm(x, w, output, eps)
    else:
        library().rmsnorm(x, w, eps, out=output)
    return output


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    form = forms["add_rmsnorm"]
    w = _weight(weight, form)
    x_dense, residual_dense = dense(x), dense(residual)
    if form == ACTIVE:
        library().add_rmsnorm(
            x_dense, residual_dense, residual_output=residual_dense, weight=w, eps=eps,
            output=x_dense,
        )  # fmt: skip
        write_back(x, x_dense)
        write_back(residual, residual_dense)
    else:
        # The legacy kernel writes only the normalized sum; the sum itself is ours to keep.
        normed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        library().add_rmsnorm(x_dense, residual_dense, w, eps, out=normed)
        residual.add_(x)
        x.copy_(normed)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """The recorded Gemma caller flattens x to 2-D [rows, hidden] first."""
    return dense(x).reshape(-1, x.shape[-1])


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    rows = _rows(x)
    output = torch.empty_like(rows)
    # (x, weight, output, eps, enable_pdl, interweave, bias, force_sdnn), positional as recorded.
    library().gemma_rmsnorm(rows, dense(weight), output, eps, False, False, None, False)
    return output.view(x.shape)


def gemma_fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    rows, residual_rows = _rows(x), _rows(residual)
    normed, summed = torch.empty_like(rows), torch.empty_like(residual_rows)
    library().gemma_add_rmsnorm(
        rows, residual_rows, weight=dense(weight), output=normed, eps=eps,
        residual_output=summed,
    )  # fmt: skip
    x.copy_(normed.view(x.shape))
    residual.copy_(summed.view(residual.shape))
