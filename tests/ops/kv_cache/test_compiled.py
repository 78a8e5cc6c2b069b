"""The kv_cache family's compiled kernel (vllm_kunlun/ops/kv_cache/compiled.py,
csrc/elementwise.cpp).

The tests are kv_cache/test_reference.py's, collected here a second time with the `kernels`
fixture pointing at the compiled provider: same inputs, same expectations. The tests below prove
the C++ path (not the reference fallback) takes contiguous inputs.
"""

import pytest
import torch

from tests.ops.helpers import compiled_provider
from tests.ops.kv_cache.test_reference import (  # noqa: F401 (collected as tests of this module)
    test_reshape_and_cache,
    test_reshape_and_cache_from_fused_qkv_views_with_int32_slots,
    test_reshape_and_cache_only_padding_changes_nothing,
)
from vllm_kunlun.ops.build import load_kernels
from vllm_kunlun.ops.kv_cache import compiled, reference
from vllm_kunlun.ops.provider import Provider


@pytest.fixture
def kernels() -> Provider:
    """The reference tests above run the compiled provider's kernels."""
    return compiled_provider()


def test_the_tests_above_call_the_compiled_kernels(kernels) -> None:
    assert kernels.reshape_and_cache is compiled.reshape_and_cache
    assert kernels.sources["reshape_and_cache"] == "kv_cache.compiled"


def test_the_kv_write_runs_in_cpp(monkeypatch) -> None:
    """The reference tests could pass on the fallback alone: the C++ path takes this."""
    monkeypatch.setattr(reference, "reshape_and_cache", lambda *a, **k: 1 / 0)
    key, cache = torch.randn(2, 2, 64), torch.zeros(4, 2, 16, 64)
    compiled.reshape_and_cache(key, key, cache, cache.clone(), torch.tensor([17, 2]))
    assert torch.equal(cache[1, :, 1], key[0]) and torch.equal(cache[0, :, 2], key[1])


def test_the_kv_write_refuses_what_it_cannot_take() -> None:
    cache, key = torch.zeros(2, 2, 16, 64), torch.randn(1, 2, 64)
    with pytest.raises(RuntimeError, match="slot_mapping must be contiguous int64"):
        load_kernels().reshape_and_cache(key, key, cache, cache.clone(),
                                         torch.tensor([0], dtype=torch.int32))  # fmt: skip
