"""The kv_cache family's Kunlun binding (vllm_kunlun/ops/kv_cache/kunlun.py) against the
recorded kunlun_ops API (KUNLUN.md §2d), through the stand-in library (tests/standin), on the
plugin's real KV-cache layout (K and V page views of one buffer)."""

import pytest
import torch

from tests.ops.helpers import DTYPES, standin_calls, wide_view
from tests.ops.kv_cache.shared import kv_page_views, plugin_kv_cache
from vllm_kunlun.ops.kv_cache import reference

HEAD_SIZE = 32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_reshape_and_cache_writes_the_plugin_layout(kunlun, dtype, block_size):
    kv_heads, num_blocks, tokens = 2, 6, 20
    buffer, key_cache, value_cache = plugin_kv_cache(num_blocks, kv_heads, block_size,
                                                     HEAD_SIZE, dtype)  # fmt: skip
    want = buffer.clone()
    slots = torch.randperm(num_blocks * block_size)[:tokens]
    slots[3] = -1  # a padding token
    kv = wide_view(tokens, 2 * kv_heads * HEAD_SIZE, dtype).view(tokens, 2, kv_heads, HEAD_SIZE)
    key, value = kv[:, 0], kv[:, 1]  # non-contiguous, as split out of qkv
    reference.reshape_and_cache(key, value, *kv_page_views(want), slots)
    kunlun.reshape_and_cache(key, value, key_cache, value_cache, slots)
    assert torch.equal(buffer, want)
    assert standin_calls() == {"reshape_and_cache_flash": 1}
