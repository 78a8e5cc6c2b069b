"""The norm family's reference kernels (vllm_kunlun/ops/norm/reference.py) against plain formulas
in float64: RMSNorm and its fused residual form in the Llama convention (x * w) and in Gemma's
(x * (1 + w)).

The Llama-convention tests take the kernels from the `kernels` fixture: norm/test_compiled.py
collects them a second time with the compiled provider's kernels.
"""

from types import ModuleType

import pytest
import torch

from tests.ops.helpers import DTYPES, assert_close_to
from tests.ops.norm.shared import plain_gemma_rms_norm, plain_rms_norm, vllm_gemma_formula
from vllm_kunlun.ops.norm import reference

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_TOKENS = [1, 3, 17, 33]
GEMMA_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
GEMMA_HIDDEN = [1, 7, 130, 1365]  # one feature, odd widths


@pytest.fixture
def kernels() -> ModuleType:
    """The kernels under test; norm/test_compiled.py overrides this with the compiled provider."""
    return reference


# RMS norm (x * w) ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("hidden", [576, 100])
# 1e-3: mean(x^2) ~ eps, so eps matters; 300: x^2 overflows float16 unless upcast first.
@pytest.mark.parametrize("x_scale", [1.0, 1e-3, 300.0])
def test_rms_norm(
    kernels, dtype: torch.dtype, num_tokens: int, hidden: int, x_scale: float
) -> None:
    eps = 1e-6
    x = (torch.randn(num_tokens, hidden) * x_scale).to(dtype)
    weight = (torch.rand(hidden) + 0.5).to(dtype)
    x_before = x.clone()
    out = kernels.rms_norm(x, weight, eps)
    assert_close_to(out, plain_rms_norm(x, weight, eps), dtype)
    assert torch.equal(x, x_before)  # not in place


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_3d_and_strided_input(kernels, dtype: torch.dtype) -> None:
    eps = 1e-5
    weight = torch.randn(100).to(dtype)
    x3 = torch.randn(2, 3, 100).to(dtype)
    assert_close_to(kernels.rms_norm(x3, weight, eps), plain_rms_norm(x3, weight, eps), dtype)
    wide = torch.randn(5, 300).to(dtype)
    x = wide[:, 100:200]  # non-contiguous column slice
    assert_close_to(kernels.rms_norm(x, weight, eps), plain_rms_norm(x, weight, eps), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("hidden", [576, 100])
def test_fused_add_rms_norm(kernels, dtype: torch.dtype, num_tokens: int, hidden: int) -> None:
    eps = 1e-6
    x = torch.randn(num_tokens, hidden).to(dtype)
    residual = torch.randn(num_tokens, hidden).to(dtype)
    weight = (torch.rand(hidden) + 0.5).to(dtype)
    x_in, residual_in = x.clone(), residual.clone()
    x_ptr, residual_ptr = x.data_ptr(), residual.data_ptr()

    assert kernels.fused_add_rms_norm(x, residual, weight, eps) is None

    assert (x.data_ptr(), residual.data_ptr()) == (x_ptr, residual_ptr)
    expected_residual = x_in.double() + residual_in.double()
    assert_close_to(residual, expected_residual, dtype)
    # The norm is of the new residual as stored (rounded to dtype), like vLLM's kernels.
    assert_close_to(x, plain_rms_norm(residual, weight, eps), dtype)
    # And, within tolerance, of the exact sum.
    assert_close_to(x, plain_rms_norm(expected_residual, weight, eps), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_on_views_writes_only_the_views(kernels, dtype: torch.dtype) -> None:
    eps = 1e-6
    hidden = 100
    x_buffer = torch.randn(7, 3 * hidden).to(dtype)
    residual_buffer = torch.randn(9, hidden).to(dtype)
    x = x_buffer[:, hidden : 2 * hidden]  # non-contiguous
    residual = residual_buffer[1:8]  # contiguous slice inside a larger buffer
    weight = torch.randn(hidden).to(dtype)
    x_buffer_in, residual_buffer_in = x_buffer.clone(), residual_buffer.clone()
    x_in, residual_in = x.clone(), residual.clone()

    kernels.fused_add_rms_norm(x, residual, weight, eps)

    assert torch.equal(x_buffer[:, :hidden], x_buffer_in[:, :hidden])
    assert torch.equal(x_buffer[:, 2 * hidden :], x_buffer_in[:, 2 * hidden :])
    assert torch.equal(residual_buffer[[0, 8]], residual_buffer_in[[0, 8]])
    assert_close_to(residual, x_in.double() + residual_in.double(), dtype)
    assert_close_to(x_buffer[:, hidden : 2 * hidden], plain_rms_norm(residual, weight, eps), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 64, 130])
def test_gemma_norm_scales_by_one_plus_the_stored_weight(hidden, dtype):
    """rms_norm with weight = 1 + w in float32 is Gemma's norm too."""
    torch.manual_seed(0)
    x = torch.randn(5, hidden, dtype=dtype)
    stored = torch.randn(hidden) * 0.1
    x64 = x.double()
    expected = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + stored.double())
    got = reference.rms_norm(x, stored.float() + 1.0, 1e-6)
    assert got.dtype == dtype
    tol = GEMMA_TOLERANCE[dtype]
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)


# Gemma's RMS norm (x * (1 + w)) ----------------------------------------------------------------


def gemma_weight(hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """Gemma's checkpoints store w centred on 0 (the norm scales by 1 + w), in the model dtype."""
    return (torch.randn(hidden) * 0.5).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 5])
@pytest.mark.parametrize("hidden", GEMMA_HIDDEN)
@pytest.mark.parametrize("x_scale", [1.0, 1e-3, 300.0])
def test_gemma_rms_norm(dtype: torch.dtype, num_tokens: int, hidden: int, x_scale: float) -> None:
    eps = 1e-6
    x = (torch.randn(num_tokens, hidden) * x_scale).to(dtype)
    weight = gemma_weight(hidden, dtype)
    x_before = x.clone()
    out = reference.gemma_rms_norm(x, weight, eps)
    assert_close_to(out, plain_gemma_rms_norm(x, weight, eps), dtype)
    assert torch.equal(x, x_before)  # not in place
    # Guards the test: (1 + w) and w really differ.
    assert not torch.allclose(out.double(), plain_rms_norm(x, weight, eps), atol=0.1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemma_rms_norm_3d_and_strided_input(dtype: torch.dtype) -> None:
    eps = 1e-6
    weight = gemma_weight(130, dtype)
    x3 = torch.randn(2, 3, 130).to(dtype)
    out = reference.gemma_rms_norm(x3, weight, eps)
    assert_close_to(out, plain_gemma_rms_norm(x3, weight, eps), dtype)
    x = torch.randn(5, 3 * 130).to(dtype)[:, 130:260]  # non-contiguous column slice
    assert not x.is_contiguous()
    assert_close_to(reference.gemma_rms_norm(x, weight, eps),
                    plain_gemma_rms_norm(x, weight, eps), dtype)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 17])
@pytest.mark.parametrize("hidden", GEMMA_HIDDEN)
def test_gemma_fused_add_rms_norm(dtype: torch.dtype, num_tokens: int, hidden: int) -> None:
    eps = 1e-6
    x = torch.randn(num_tokens, hidden).to(dtype)
    residual = torch.randn(num_tokens, hidden).to(dtype)
    weight = gemma_weight(hidden, dtype)
    x_in, residual_in = x.clone(), residual.clone()
    x_ptr, residual_ptr = x.data_ptr(), residual.data_ptr()

    assert reference.gemma_fused_add_rms_norm(x, residual, weight, eps) is None

    assert (x.data_ptr(), residual.data_ptr()) == (x_ptr, residual_ptr)
    expected_residual = x_in.double() + residual_in.double()
    assert_close_to(residual, expected_residual, dtype)
    # The norm of the new residual as stored, and within tolerance of the exact sum.
    assert_close_to(x, plain_gemma_rms_norm(residual, weight, eps), dtype)
    assert_close_to(x, plain_gemma_rms_norm(expected_residual, weight, eps), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemma_fused_add_rms_norm_on_views_writes_only_the_views(dtype: torch.dtype) -> None:
    eps = 1e-6
    hidden = 101
    x_buffer = torch.randn(7, 3 * hidden).to(dtype)
    residual_buffer = torch.randn(9, hidden).to(dtype)
    x = x_buffer[:, hidden : 2 * hidden]  # non-contiguous
    residual = residual_buffer[1:8]  # contiguous slice inside a larger buffer
    weight = gemma_weight(hidden, dtype)
    x_buffer_in, residual_buffer_in = x_buffer.clone(), residual_buffer.clone()
    x_in, residual_in = x.clone(), residual.clone()

    reference.gemma_fused_add_rms_norm(x, residual, weight, eps)

    assert torch.equal(x_buffer[:, :hidden], x_buffer_in[:, :hidden])
    assert torch.equal(x_buffer[:, 2 * hidden :], x_buffer_in[:, 2 * hidden :])
    assert torch.equal(residual_buffer[[0, 8]], residual_buffer_in[[0, 8]])
    assert_close_to(residual, x_in.double() + residual_in.double(), dtype)
    expected = plain_gemma_rms_norm(residual, weight, eps)
    assert_close_to(x_buffer[:, hidden : 2 * hidden], expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (5, 130), (2, 3, 1365)])
def test_gemma_ops_are_vllms_gemma_formula(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """Bit for bit vLLM's GemmaRMSNorm.forward_static: float32 throughout, (1 + w.float()), one
    rounding at the end (unlike the Llama convention, which rounds before the weight)."""
    eps = 1e-6
    x = torch.randn(*shape).to(dtype)
    weight = gemma_weight(shape[-1], dtype)
    assert torch.equal(reference.gemma_rms_norm(x, weight, eps), vllm_gemma_formula(x, weight, eps))

    residual = torch.randn(*shape).to(dtype)
    summed = x + residual  # the residual as stored, in x's dtype
    x_op, residual_op = x.clone(), residual.clone()
    reference.gemma_fused_add_rms_norm(x_op, residual_op, weight, eps)
    assert torch.equal(residual_op, summed)
    assert torch.equal(x_op, vllm_gemma_formula(summed, weight, eps))
    # vLLM's native fused form normalizes the float32 sum before rounding it: within one rounding.
    unrounded = x.float() + residual.float()
    assert_close_to(x_op, vllm_gemma_formula(unrounded, weight, eps).double(), dtype)
