"""The norm family's compiled kernels (vllm_kunlun/ops/norm/compiled.py, csrc/elementwise.cpp).

The Llama-convention tests are norm/test_reference.py's, collected here a second time with the
`kernels` fixture pointing at the compiled provider: same inputs, same plain-formula oracles.
Inputs the C++ kernels do not take (strided views, float16) go through the reference fallback,
and the tests below prove the C++ path takes the rest. The Gemma norms run the reference.
"""

import pytest
import torch

from tests.ops.helpers import DTYPES, assert_close_to, compiled_provider
from tests.ops.norm.shared import plain_rms_norm, vllm_gemma_formula
from tests.ops.norm.test_reference import (  # noqa: F401 (collected as tests of this module)
    test_fused_add_rms_norm,
    test_fused_add_rms_norm_on_views_writes_only_the_views,
    test_rms_norm,
    test_rms_norm_3d_and_strided_input,
)
from vllm_kunlun.ops.build import load_kernels
from vllm_kunlun.ops.norm import compiled, reference
from vllm_kunlun.ops.provider import Provider


@pytest.fixture
def kernels() -> Provider:
    """The reference tests above run the compiled provider's kernels."""
    return compiled_provider()


def test_the_tests_above_call_the_compiled_kernels(kernels) -> None:
    assert kernels.rms_norm is compiled.rms_norm
    assert kernels.fused_add_rms_norm is compiled.fused_add_rms_norm
    assert kernels.sources["rms_norm"] == kernels.sources["fused_add_rms_norm"] == "norm.compiled"


def test_row_ops_run_in_cpp_for_contiguous_inputs(monkeypatch) -> None:
    """The reference tests could pass on the fallback alone: the C++ path takes these."""
    for name in ("rms_norm", "fused_add_rms_norm"):
        monkeypatch.setattr(reference, name, lambda *a, **k: 1 / 0)
    x, residual, weight = torch.randn(3, 100), torch.randn(3, 100), torch.rand(100) + 0.5
    expected = plain_rms_norm(x, weight, 1e-6)
    assert_close_to(compiled.rms_norm(x, weight, 1e-6), expected, torch.float32)
    compiled.fused_add_rms_norm(x, residual, weight, 1e-6)
    with pytest.raises(ZeroDivisionError):  # float16 rows are sent to the reference
        compiled.rms_norm(x.half(), weight.half(), 1e-6)


def test_row_ops_refuse_what_they_cannot_take() -> None:
    kernels = load_kernels()
    x = torch.randn(4, 100)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        kernels.rms_norm(x[:, :50], torch.ones(50), 1e-6)
    with pytest.raises(RuntimeError, match="share a dtype"):
        kernels.rms_norm(x, torch.ones(100, dtype=torch.float64), 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemma_norms_are_the_reference_and_vllms_formula(dtype: torch.dtype) -> None:
    provider = compiled_provider()
    assert provider.sources["gemma_rms_norm"] == "norm.reference"
    assert provider.sources["gemma_fused_add_rms_norm"] == "norm.reference"
    x, residual = torch.randn(2, 5, 130).to(dtype).unbind(0)
    weight = (torch.randn(130) * 0.5).to(dtype)
    expected = vllm_gemma_formula(x, weight, 1e-6)
    assert torch.equal(provider.gemma_rms_norm(x, weight, 1e-6), expected)
    provider.gemma_fused_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(x, vllm_gemma_formula(residual, weight, 1e-6))
