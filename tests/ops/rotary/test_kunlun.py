"""The rotary family's Kunlun binding (vllm_kunlun/ops/rotary/kunlun.py) against the recorded
kunlun_ops API (KUNLUN.md §2c), through the stand-in library (tests/standin)."""

import pytest
import torch

from tests.ops.helpers import DTYPES, standin_calls
from tests.ops.rotary.shared import make_cos_sin_cache
from vllm_kunlun.ops.rotary import reference

HEAD_SIZE = 32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [HEAD_SIZE, HEAD_SIZE // 2])
@pytest.mark.parametrize("layout", ["qkv_views", "contiguous", "no_key"])
def test_rotary_embedding(kunlun, dtype, is_neox, rotary_dim, layout):
    tokens, heads, kv_heads = 7, 4, 2
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * HEAD_SIZE).to(dtype)
    sizes = [heads * HEAD_SIZE, kv_heads * HEAD_SIZE, kv_heads * HEAD_SIZE]
    query, key, _ = qkv.split(sizes, dim=-1)
    if layout != "qkv_views":
        query, key = query.contiguous(), key.contiguous()
    if layout == "no_key":
        key = None
    positions = torch.randint(0, 64, (tokens,))
    cache = make_cos_sin_cache(64, rotary_dim, dtype)
    want_q = query.clone()
    want_k = None if key is None else key.clone()
    reference.rotary_embedding(positions, want_q, want_k, HEAD_SIZE, cache, is_neox)
    query_ptr = query.data_ptr()
    kunlun.rotary_embedding(positions, query, key, HEAD_SIZE, cache, is_neox)
    torch.testing.assert_close(query, want_q)
    if key is not None:
        torch.testing.assert_close(key, want_k)
    assert query.data_ptr() == query_ptr
    assert standin_calls() == {"rotary_embedding": 1}
