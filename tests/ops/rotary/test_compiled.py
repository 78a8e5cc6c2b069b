"""The rotary family's compiled kernel (vllm_kunlun/ops/rotary/compiled.py,
csrc/rotary_embedding.cpp) against the plain formula and the reference kernel, on the scenarios
the reference is tested with (tests/ops/rotary/shared.py)."""

import pytest
import torch

from tests.ops.helpers import DTYPES, assert_close_to
from tests.ops.rotary.shared import (
    FUSED_QKV_SHAPE,
    ROTARY_SHAPES,
    flat_query_and_key,
    fused_qkv_views,
    plain_rotary,
    rotary_shape_id,
)
from vllm_kunlun.ops.rotary import compiled, reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("num_tokens", [1, 17])
@pytest.mark.parametrize("shape", ROTARY_SHAPES, ids=rotary_shape_id)
def test_rotary_embedding_flat_query_and_key(
    dtype: torch.dtype, is_neox: bool, num_tokens: int, shape: tuple[int, int, int, int]
) -> None:
    problem = flat_query_and_key(dtype, is_neox, num_tokens, shape)
    query, key, head_size, cache = problem.query, problem.key, problem.head_size, problem.cache
    same_query, same_key = query.clone(), key.clone()
    reference.rotary_embedding(problem.positions, same_query, same_key, head_size, cache, is_neox)

    compiled.rotary_embedding(*problem.args())

    assert_close_to(query, problem.expected_query, dtype)
    assert_close_to(key, problem.expected_key, dtype)
    # Same float32 arithmetic as the reference, so at most one rounding apart.
    assert_close_to(query, same_query.double(), dtype)
    assert_close_to(key, same_key.double(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_rotary_embedding_on_fused_qkv_views_and_3d_query(dtype: torch.dtype, is_neox: bool):
    """Column slices of one qkv tensor (partial rotary): writes land in those columns only."""
    num_tokens = 33
    heads, kv_heads, head_size, _ = FUSED_QKV_SHAPE
    q_width, kv_width = heads * head_size, kv_heads * head_size
    qkv, problem = fused_qkv_views(dtype, is_neox, num_tokens)
    qkv_in = qkv.clone()

    compiled.rotary_embedding(*problem.args())

    assert_close_to(qkv[:, :q_width], problem.expected_query, dtype)
    assert_close_to(qkv[:, q_width : q_width + kv_width], problem.expected_key, dtype)
    assert torch.equal(qkv[:, q_width + kv_width :], qkv_in[:, q_width + kv_width :])

    positions, cache = problem.positions, problem.cache
    query3d = torch.randn(num_tokens, heads, head_size).to(dtype)
    expected = plain_rotary(positions, query3d, head_size, cache, is_neox)
    compiled.rotary_embedding(positions, query3d, None, head_size, cache, is_neox)
    assert query3d.shape == (num_tokens, heads, head_size)
    assert_close_to(query3d, expected, dtype)
