"""The compiled provider's norm and KV-write kernels, through the reference kernels' own tests.

The tests below are tests/test_reference_kernels.py's, collected here a second time with
`reference.<op>` pointed at the compiled provider: same inputs, same plain-formula oracles.
Inputs the C++ kernels do not take (strided views) go through the provider's fallback, and
tests/test_compiled_kernels.py proves the C++ path takes the rest.
"""

import pytest
import torch

from tests.test_reference_kernels import (  # noqa: F401 (collected as tests of this module)
    test_fused_add_rms_norm,
    test_fused_add_rms_norm_on_views_writes_only_the_views,
    test_reshape_and_cache,
    test_reshape_and_cache_from_fused_qkv_views_with_int32_slots,
    test_reshape_and_cache_only_padding_changes_nothing,
    test_rms_norm,
    test_rms_norm_3d_and_strided_input,
)
from vllm_kunlun.ops import reference
from vllm_kunlun.ops.compiled_provider import CompiledProvider

COMPILED_ROW_OPS = ("rms_norm", "fused_add_rms_norm", "reshape_and_cache")


@pytest.fixture(autouse=True)
def compiled_row_ops(monkeypatch) -> None:
    torch.manual_seed(0)
    for name in COMPILED_ROW_OPS:
        monkeypatch.setattr(reference, name, getattr(CompiledProvider, name))


def test_the_tests_above_call_the_compiled_provider() -> None:
    assert reference.rms_norm is CompiledProvider.rms_norm
    assert reference.reshape_and_cache is CompiledProvider.reshape_and_cache
