"""Emulated-device fast path for the Llama-convention norms (csrc/elementwise.cpp); layouts the
C++ does not take go to the reference. The Gemma norms run the reference."""

import torch

from vllm_kunlun.ops.build import load_kernels, row_layout
from vllm_kunlun.ops.norm import reference


def prepare() -> None:
    load_kernels()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if not row_layout(x, weight):
        return reference.rms_norm(x, weight, eps)
    return load_kernels().rms_norm(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    if not row_layout(x, residual, weight):
        reference.fused_add_rms_norm(x, residual, weight, eps)
        return
    load_kernels().fused_add_rms_norm(x, residual, weight, eps)
