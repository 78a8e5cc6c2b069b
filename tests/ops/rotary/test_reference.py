"""The reference kernels' fast paths for the layouts vLLM hands them give the plain results."""

import pytest
import torch

from tests.test_reference_kernels import make_cos_sin_cache, plain_rotary
from vllm_kunlun.ops import reference
from vllm_kunlun.ops.reference.rotary import _heads_of_both

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("heads, kv_heads, head_size, rotary_dim", [(4, 2, 32, 32), (3, 1, 80, 32)])
def test_rotary_on_views_of_a_fused_qkv_projection(heads, kv_heads, head_size, rotary_dim,
                                                   is_neox, dtype):  # fmt: skip
    """q and k split from one qkv row are rotated together; v stays untouched."""
    torch.manual_seed(0)
    tokens = 7
    cache = make_cos_sin_cache(64, rotary_dim, dtype)
    positions = torch.randint(0, 64, (tokens,))
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_size, dtype=dtype)
    original = qkv.clone()
    query, key, value = qkv.split([heads * head_size, kv_heads * head_size,
                                   kv_heads * head_size], dim=-1)  # fmt: skip
    expected_query = plain_rotary(positions, query.clone(), head_size, cache, is_neox)
    expected_key = plain_rotary(positions, key.clone(), head_size, cache, is_neox)
    assert _heads_of_both(query, key, tokens, head_size) is not None

    reference.rotary_embedding(positions, query, key, head_size, cache, is_neox)

    tol = TOLERANCE[dtype]
    torch.testing.assert_close(query, expected_query.to(dtype), atol=tol, rtol=tol)
    torch.testing.assert_close(key, expected_key.to(dtype), atol=tol, rtol=tol)
    assert torch.equal(value, original[:, (heads + kv_heads) * head_size :])


def test_rotary_of_query_and_key_in_separate_buffers_is_not_joined():
    """Tensors that merely sit next to each other in other layouts take the separate path."""
    torch.manual_seed(0)
    cache = make_cos_sin_cache(16, 32, torch.float32)
    positions = torch.arange(4)
    buffer = torch.randn(2, 4, 64)  # [q | k] stacked by tensor, not per token
    query, key = buffer[0], buffer[1]
    expected_query = plain_rotary(positions, query.clone(), 32, cache, True)
    expected_key = plain_rotary(positions, key.clone(), 32, cache, True)
    assert _heads_of_both(query, key, 4, 32) is None
    reference.rotary_embedding(positions, query, key, 32, cache, True)
    torch.testing.assert_close(query, expected_query.float())
    torch.testing.assert_close(key, expected_key.float())
