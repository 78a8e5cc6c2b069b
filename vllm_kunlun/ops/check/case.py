"""One check-kernels case, and helpers to build the tensors cases share.

A case builds the op's arguments, in the op's order, for a dtype on a device; floating tensors
get that dtype, index tensors stay integer. Views are taken after the move to the device, so a
case's non-contiguous inputs stay non-contiguous there. Random values come from the generator
the runner seeds per case, so a case is the same on every host.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

Make = Callable[[torch.dtype, torch.device, torch.Generator], tuple]

#: (atol, rtol) per dtype: floating outputs pass when max |got - want| <= atol + rtol * max |want|
#: (integer outputs are compared on their own, against Case.integer_tolerance).
TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (1e-2, 2e-2),
    torch.float16: (2e-3, 4e-3),
}


@dataclass(frozen=True)
class Case:
    name: str
    make: Make
    #: Large cases (`--quick` skips them).
    big: bool = False
    #: Per-dtype (atol, rtol) overrides of TOLERANCE.
    tolerance: dict[torch.dtype, tuple[float, float]] | None = None
    #: Largest |got - want| allowed in integer outputs (ids, quantized values): exact unless
    #: a case says otherwise, whatever the dtype.
    integer_tolerance: int = 0

    def tolerance_for(self, dtype: torch.dtype) -> tuple[float, float]:
        return (self.tolerance or {}).get(dtype, TOLERANCE[dtype])


def randn(shape, dtype, device, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)


def wide_view(rows: int, cols: int, dtype, device, g, extra: int = 16) -> torch.Tensor:
    """A [rows, cols] non-contiguous view, like q/k/v split out of a fused qkv projection."""
    return randn((rows, cols + extra), dtype, device, g)[:, extra:]


def paged_kv(
    num_blocks: int, kv_heads: int, block_size: int, head_size: int, dtype, device, g
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V page views of one [blocks, Hkv, bs, 2 * D] buffer: the plugin's KV layout."""
    buffer = randn((num_blocks, 2, kv_heads, block_size, head_size), dtype, device, g)
    return buffer[:, 0], buffer[:, 1]


def block_table(seq_lens: list[int], block_size: int, num_blocks: int, device, g) -> torch.Tensor:
    """[R, max_blocks] int32: every request's blocks, drawn without repeats from a shuffled pool
    (block 0 is left out, as vLLM keeps it as its null block); unused entries are 0."""
    needed = [-(-n // block_size) for n in seq_lens]
    pool = torch.randperm(num_blocks - 1, generator=g) + 1
    if sum(needed) > pool.numel():
        raise ValueError(f"case needs {sum(needed)} blocks, has {num_blocks - 1}")
    table = torch.zeros(len(seq_lens), max(needed), dtype=torch.int32)
    start = 0
    for row, count in enumerate(needed):
        table[row, :count] = pool[start : start + count].to(torch.int32)
        start += count
    return table.to(device)


def cumulative(lengths: list[int], device) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


def int_tensor(values: list[int], device, dtype=torch.int32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)
