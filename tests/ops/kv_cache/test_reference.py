"""The kv_cache family's reference kernel (vllm_kunlun/ops/kv_cache/reference.py): each token's
key and value land in its slot of the paged cache, padding slots (-1) change nothing, and every
other byte of the cache stays as it was.

The tests take the kernels from the `kernels` fixture: kv_cache/test_compiled.py collects them a
second time with the compiled provider's kernels.
"""

from types import ModuleType

import pytest
import torch

from tests.ops.helpers import DTYPES
from vllm_kunlun.ops.kv_cache import reference

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK_SIZES = [16, 32, 64, 128]


@pytest.fixture
def kernels() -> ModuleType:
    """The kernels under test; kv_cache/test_compiled.py overrides this with the compiled one."""
    return reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("num_tokens", [1, 17, 33])
def test_reshape_and_cache(kernels, dtype: torch.dtype, block_size: int, num_tokens: int) -> None:
    kv_heads, head_size, num_blocks = 3, 80, 5
    key = torch.randn(num_tokens, kv_heads, head_size).to(dtype)
    value = torch.randn(num_tokens, kv_heads, head_size).to(dtype)
    shape = (num_blocks, kv_heads, block_size, head_size)
    key_cache, value_cache = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    # Distinct random slots over the whole pool; every third token is padding (slot -1).
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[1::3] = -1
    expected_key, expected_value = key_cache.clone(), value_cache.clone()
    for token, slot in enumerate(slots.tolist()):
        if slot >= 0:
            block, offset = divmod(slot, block_size)
            for head in range(kv_heads):
                expected_key[block, head, offset] = key[token, head]
                expected_value[block, head, offset] = value[token, head]

    kernels.reshape_and_cache(key, value, key_cache, value_cache, slots)

    # Exact: written slots hold the tokens, every other byte of the cache is unchanged.
    assert torch.equal(key_cache, expected_key)
    assert torch.equal(value_cache, expected_value)


def test_reshape_and_cache_only_padding_changes_nothing(kernels) -> None:
    key = torch.randn(3, 2, 64)
    key_cache = torch.randn(2, 2, 16, 64)
    value_cache = torch.randn(2, 2, 16, 64)
    before = key_cache.clone(), value_cache.clone()
    kernels.reshape_and_cache(key, key, key_cache, value_cache, torch.full((3,), -1))
    assert torch.equal(key_cache, before[0]) and torch.equal(value_cache, before[1])


def test_reshape_and_cache_from_fused_qkv_views_with_int32_slots(kernels) -> None:
    num_tokens, kv_heads, head_size, block_size = 5, 2, 64, 16
    qkv = torch.randn(num_tokens, (4 + 2 * kv_heads) * head_size)
    key = qkv[:, 4 * head_size : (4 + kv_heads) * head_size].view(num_tokens, kv_heads, head_size)
    value = qkv[:, (4 + kv_heads) * head_size :].view(num_tokens, kv_heads, head_size)
    key_cache = torch.zeros(3, kv_heads, block_size, head_size)
    value_cache = torch.zeros(3, kv_heads, block_size, head_size)
    slots = torch.tensor([47, 0, -1, 16, 15], dtype=torch.int32)
    kernels.reshape_and_cache(key, value, key_cache, value_cache, slots)
    for token, (block, offset) in {0: (2, 15), 1: (0, 0), 3: (1, 0), 4: (0, 15)}.items():
        assert torch.equal(key_cache[block, :, offset], key[token])
        assert torch.equal(value_cache[block, :, offset], value[token])
    assert int((key_cache != 0).any(dim=-1).sum()) == 4 * kv_heads
