"""Activation family: gated activations of an MLP, x = [gate | up] along the last dimension."""

import torch

from vllm_kunlun.ops.declare import half_of_last_dim, kernel_op


@kernel_op(fake=half_of_last_dim)
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; a new contiguous tensor."""


@kernel_op(fake=half_of_last_dim)
def gelu_and_mul(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """gelu(gate) * up, approximate "none" (erf) or "tanh"; a new contiguous tensor."""
