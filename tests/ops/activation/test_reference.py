"""Gemma's ops against plain formulas: GELU-and-mul (erf and tanh) and the (1 + w) RMSNorm."""

import math

import pytest
import torch

from vllm_kunlun.ops import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
SHAPES = [(1, 2), (7, 130), (3, 5, 86), (17, 2 * 1365)]  # one token, odd widths, 3-D


def plain_gelu(g: torch.Tensor, approximate: str) -> torch.Tensor:
    g = g.double()
    if approximate == "tanh":
        return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
    return 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_and_mul_matches_the_formula(shape, dtype, approximate):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=dtype) * 3
    half = shape[-1] // 2
    expected = plain_gelu(x[..., :half], approximate) * x[..., half:].double()
    got = reference.gelu_and_mul(x, approximate)
    assert got.dtype == dtype and got.shape == (*shape[:-1], half) and got.is_contiguous()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)


def test_gelu_and_mul_on_a_non_contiguous_input_and_a_bad_mode():
    x = torch.randn(8, 20)[:, ::2]  # strided columns
    expected = plain_gelu(x[:, :5], "tanh") * x[:, 5:].double()
    torch.testing.assert_close(reference.gelu_and_mul(x, "tanh").double(), expected)
    with pytest.raises(ValueError, match="'none' or 'tanh'"):
        reference.gelu_and_mul(x, "sigmoid")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 64, 130])
def test_gemma_norm_scales_by_one_plus_the_stored_weight(hidden, dtype):
    """The plugin's Gemma layer calls rms_norm with weight = 1 + w in float32 (layers.py)."""
    torch.manual_seed(0)
    x = torch.randn(5, hidden, dtype=dtype)
    stored = torch.randn(hidden) * 0.1
    x64 = x.double()
    expected = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + stored.double())
    got = reference.rms_norm(x, stored.float() + 1.0, 1e-6)
    assert got.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)
