"""What the kernel tests of every family share: dtypes and tolerances, the comparison against a
float64 expectation, strided inputs, and the stand-in kunlun_ops library's call counts.

The kernel tests import torch and vllm_kunlun.ops only, never vLLM (the kernel layer must work
without it; tests/ops/test_provider.py checks that in a process where vLLM cannot import).
"""

import functools
import sys
from pathlib import Path

import torch

#: tests/standin: put it on sys.path and `import kunlun_ops` finds the stand-in library.
STANDIN = Path(__file__).resolve().parents[1] / "standin"

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    # One or two roundings to the output dtype on values of order 1.
    torch.float32: {"rtol": 2e-5, "atol": 2e-5},
    torch.float16: {"rtol": 3e-3, "atol": 3e-3},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
}


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """`actual` has `dtype`, the shape of `expected` and its values within one or two roundings."""
    assert actual.dtype == dtype
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected.double(), **TOLERANCES[dtype])


def wide_view(rows: int, cols: int, dtype: torch.dtype, extra: int = 16) -> torch.Tensor:
    """A [rows, cols] non-contiguous view, like q/k/v split out of a fused qkv projection."""
    return torch.randn(rows, cols + extra).to(dtype)[:, extra:]


def standin_calls() -> dict[str, int]:
    """kunlun_ops functions the stand-in library ran since it was imported, with counts."""
    return dict(sys.modules["kunlun_ops"].CALLS)


@functools.cache
def compiled_provider():
    """The compiled provider, built once per test session (its C++ kernels compile once)."""
    from vllm_kunlun.ops.provider import Provider

    return Provider("compiled").prepare()
