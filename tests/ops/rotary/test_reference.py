"""The rotary family's reference kernel (vllm_kunlun/ops/rotary/reference.py) against the plain
formula in float64: NeoX and GPT-J pairing, partial rotary, query and key as views of a fused qkv
projection (rotated together in one pass when they are adjacent), 3-D query, no key."""

import pytest
import torch

from tests.ops.helpers import DTYPES, assert_close_to
from tests.ops.rotary.shared import (
    FUSED_QKV_SHAPE,
    ROTARY_SHAPES,
    flat_query_and_key,
    fused_qkv_views,
    make_cos_sin_cache,
    plain_rotary,
    rotary_shape_id,
)
from vllm_kunlun.ops.rotary import reference
from vllm_kunlun.ops.rotary.reference import _heads_of_both

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("num_tokens", [1, 17])
@pytest.mark.parametrize("shape", ROTARY_SHAPES, ids=rotary_shape_id)
def test_rotary_embedding_flat_query_and_key(
    dtype: torch.dtype, is_neox: bool, num_tokens: int, shape: tuple[int, int, int, int]
) -> None:
    head_size, rotary_dim = shape[2], shape[3]
    problem = flat_query_and_key(dtype, is_neox, num_tokens, shape)
    query, key = problem.query, problem.key
    query_in, key_in = query.clone(), key.clone()

    assert reference.rotary_embedding(*problem.args()) is None

    assert_close_to(query, problem.expected_query, dtype)
    assert_close_to(key, problem.expected_key, dtype)
    # Features past rotary_dim pass through untouched.
    by_head = (num_tokens, -1, head_size)
    tail_q, tail_k = query.view(by_head)[..., rotary_dim:], key.view(by_head)[..., rotary_dim:]
    assert torch.equal(tail_q, query_in.view(by_head)[..., rotary_dim:])
    assert torch.equal(tail_k, key_in.view(by_head)[..., rotary_dim:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("num_tokens", [3, 33])
def test_rotary_embedding_on_fused_qkv_views(
    dtype: torch.dtype, is_neox: bool, num_tokens: int
) -> None:
    """query and key as column slices of one qkv tensor: the writes must land in those columns."""
    heads, kv_heads, head_size, _ = FUSED_QKV_SHAPE
    q_width, kv_width = heads * head_size, kv_heads * head_size
    qkv, problem = fused_qkv_views(dtype, is_neox, num_tokens)
    assert not problem.query.is_contiguous() and not problem.key.is_contiguous()
    qkv_in = qkv.clone()

    reference.rotary_embedding(*problem.args())

    assert_close_to(qkv[:, :q_width], problem.expected_query, dtype)
    assert_close_to(qkv[:, q_width : q_width + kv_width], problem.expected_key, dtype)
    assert torch.equal(qkv[:, q_width + kv_width :], qkv_in[:, q_width + kv_width :])  # values


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_rotary_embedding_3d_query_without_key(dtype: torch.dtype, is_neox: bool) -> None:
    num_tokens, heads, head_size, rotary_dim = 17, 3, 64, 32
    cache = make_cos_sin_cache(512, rotary_dim, dtype)
    positions = torch.randint(0, 512, (num_tokens,))
    query = torch.randn(num_tokens, heads, head_size).to(dtype)
    expected = plain_rotary(positions, query, head_size, cache, is_neox)

    reference.rotary_embedding(positions, query, None, head_size, cache, is_neox)

    assert query.shape == (num_tokens, heads, head_size)
    assert_close_to(query, expected, dtype)


def test_rotary_layouts_differ_and_position_zero_is_identity() -> None:
    """Guards the rotary tests: the two layouts really differ, and position 0 rotates nothing."""
    head_size = 64
    cache = make_cos_sin_cache(64, head_size, torch.float32)
    x = torch.randn(2, head_size)
    positions = torch.tensor([0, 37])
    neox, gptj = x.clone(), x.clone()
    reference.rotary_embedding(positions, neox, None, head_size, cache, True)
    reference.rotary_embedding(positions, gptj, None, head_size, cache, False)
    assert torch.equal(neox[0], x[0]) and torch.equal(gptj[0], x[0])
    assert not torch.allclose(neox[1], gptj[1], atol=1e-2)
    assert not torch.allclose(neox[1], x[1], atol=1e-2)
    # A rotation preserves the norm of each pair, hence of the head.
    torch.testing.assert_close(neox[1].norm(), x[1].norm())


# The fast path for the layouts vLLM hands over ------------------------------------------------


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
