import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, where x = [gate | up] along the last dimension."""
    gate, up = x.chunk(2, dim=-1)
    return (F.silu(gate) * up).contiguous()  # contiguous, as the op's fake promises


def gelu_and_mul(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """gelu(gate) * up, where x = [gate | up]; approximate is "none" (erf) or "tanh"."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu_and_mul: approximate must be 'none' or 'tanh', not {approximate!r}")
    gate, up = x.chunk(2, dim=-1)
    return (F.gelu(gate, approximate=approximate) * up).contiguous()
