"""Norm family: RMSNorm and its fused residual form, in the Llama and the Gemma convention.

Declarations only: the kernels are in reference.py (the specification), compiled.py (the
emulated device's C++ fast path) and kunlun.py (the Kunlun binding).
"""

import torch

from vllm_kunlun.ops.declare import kernel_op, same_as_first_input


@kernel_op(fake=same_as_first_input)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dimension; a new tensor."""


@kernel_op(mutates_args=("x", "residual"))
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """In place: residual <- x + residual, then x <- rms_norm(residual, weight, eps)."""


@kernel_op(fake=same_as_first_input)
def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: the checkpoint stores w and the norm scales by (1 + w)."""


@kernel_op(mutates_args=("x", "residual"))
def gemma_fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """In place: residual <- x + residual, then x <- gemma_rms_norm(residual, weight, eps)."""
