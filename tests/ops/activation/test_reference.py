"""The activation family's reference kernels (vllm_kunlun/ops/activation/reference.py) against
plain formulas in float64: SiLU-and-mul and GELU-and-mul (erf and tanh)."""

import math

import pytest
import torch

from tests.ops.helpers import DTYPES, assert_close_to
from vllm_kunlun.ops.activation import reference

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_TOKENS = [1, 3, 17, 33]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
SHAPES = [(1, 2), (7, 130), (3, 5, 86), (17, 2 * 1365)]  # one token, odd widths, 3-D


def plain_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    gate, up = x[..., :half].double(), x[..., half:].double()
    return gate / (1.0 + torch.exp(-gate)) * up


def plain_gelu(g: torch.Tensor, approximate: str) -> torch.Tensor:
    g = g.double()
    if approximate == "tanh":
        return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
    return 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))


# SiLU and mul ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("width", [100, 576, 1])
def test_silu_and_mul(dtype: torch.dtype, num_tokens: int, width: int) -> None:
    x = (torch.randn(num_tokens, 2 * width) * 3).to(dtype)
    x_before = x.clone()
    out = reference.silu_and_mul(x)
    assert out.shape == (num_tokens, width)
    assert_close_to(out, plain_silu_and_mul(x), dtype)
    assert torch.equal(x, x_before)


def test_silu_and_mul_is_not_symmetric_in_its_halves() -> None:
    """Guards the test above: swapping gate and up would be caught."""
    x = torch.randn(3, 2 * 8, dtype=torch.float64)
    swapped = torch.cat([x[:, 8:], x[:, :8]], dim=-1)
    out = reference.silu_and_mul(x)
    torch.testing.assert_close(out, plain_silu_and_mul(x))
    assert not torch.allclose(out, plain_silu_and_mul(swapped))


def test_silu_and_mul_leading_dims() -> None:
    x = torch.randn(2, 3, 2 * 100)
    assert_close_to(reference.silu_and_mul(x), plain_silu_and_mul(x), torch.float32)


# GELU and mul ------------------------------------------------------------------------------


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
