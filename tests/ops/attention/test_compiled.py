"""The attention family's compiled kernel (vllm_kunlun/ops/attention/compiled.py,
csrc/decode_attention.cpp) against the plain formula and the reference kernel, over the shapes,
dtypes, layouts, windows and soft-caps the reference is tested with (tests/ops/attention/
shared.py). Prefill and encoder attention run the reference."""

import pytest
import torch

from tests.ops.attention.shared import (
    ATTENTION_CASES,
    WINDOW_SOFTCAP,
    PagedKV,
    build_paged_kv,
    decode_problem,
    expected_decode,
    run_decode,
    window_softcap_decode_problem,
)
from tests.ops.helpers import DTYPES, assert_close_to
from vllm_kunlun.ops.attention import compiled


def run_compiled(
    paged: PagedKV, query: torch.Tensor, seq_lens: list[int], scale: float,
    sliding_window: int, softcap: float, out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    return run_decode(paged, query, seq_lens, scale, sliding_window, softcap, out=out,
                      kernel=compiled.decode_attention)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("block_size", "heads", "kv_heads"), ATTENTION_CASES)
def test_decode_attention(dtype: torch.dtype, block_size: int, heads: int, kv_heads: int) -> None:
    paged, query, seq_lens, scale = decode_problem(dtype, block_size, heads, kv_heads)

    out = run_compiled(paged, query, seq_lens, scale, -1, 0.0)

    assert_close_to(out, expected_decode(paged, query, seq_lens, scale, -1, 0.0), dtype)
    assert_close_to(out, run_decode(paged, query, seq_lens, scale, -1, 0.0).double(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("sliding_window", "softcap"), WINDOW_SOFTCAP)
def test_decode_attention_sliding_window_and_softcap(
    dtype: torch.dtype, sliding_window: int, softcap: float
) -> None:
    # head size 72: not a multiple of 16
    paged, query, seq_lens, scale = window_softcap_decode_problem(dtype, head_size=72)

    out = run_compiled(paged, query, seq_lens, scale, sliding_window, softcap)

    expected = expected_decode(paged, query, seq_lens, scale, sliding_window, softcap)
    assert_close_to(out, expected, dtype)


def test_decode_attention_on_interleaved_caches_strided_query_and_output_slice() -> None:
    """The plugin's KV cache interleaves K and V pages, the query is a view of a fused qkv
    tensor, and the output is a slice of a larger buffer whose other rows must stay as they were."""
    block_size, heads, kv_heads, head_size = 32, 9, 3, 64
    seq_lens = [7, 40, 65, 1]
    requests = len(seq_lens)
    paged = build_paged_kv(seq_lens, kv_heads, head_size, block_size, torch.bfloat16)
    both = torch.stack([paged.key_cache, paged.value_cache], dim=1)  # [blocks, 2, Hkv, bs, D]
    interleaved = PagedKV(both[:, 0], both[:, 1], paged.block_table, paged.keys, paged.values)
    assert not interleaved.key_cache.is_contiguous()
    qkv = torch.randn(requests, (heads + 2 * kv_heads) * head_size).to(torch.bfloat16)
    query = qkv[:, : heads * head_size].view(requests, heads, head_size)
    buffer = torch.randn(requests + 2, heads, head_size).to(torch.bfloat16)
    untouched = buffer[[0, requests + 1]].clone()

    run_compiled(interleaved, query, seq_lens, 0.125, -1, 0.0, out=buffer[1 : requests + 1])

    assert torch.equal(buffer[[0, requests + 1]], untouched)
    expected = expected_decode(paged, query, seq_lens, 0.125, -1, 0.0)
    assert_close_to(buffer[1 : requests + 1], expected, torch.bfloat16)


def test_decode_attention_never_reads_past_the_sequence_end() -> None:
    block_size, heads, kv_heads, head_size = 16, 4, 2, 64
    seq_lens = [5, 16]
    paged = build_paged_kv(seq_lens, kv_heads, head_size, block_size, torch.float32)
    block = int(paged.block_table[0, 0])
    paged.key_cache[block, :, seq_lens[0] :] = float("nan")
    paged.value_cache[block, :, seq_lens[0] :] = float("inf")
    query = torch.randn(2, heads, head_size)
    out = run_compiled(paged, query, seq_lens, 0.125, -1, 0.0)
    assert_close_to(out, expected_decode(paged, query, seq_lens, 0.125, -1, 0.0), torch.float32)


def test_bad_inputs_get_a_clear_error() -> None:
    paged = build_paged_kv([5], 2, 64, 16, torch.float32)
    query = torch.randn(1, 3, 64)  # 3 query heads over 2 kv heads
    with pytest.raises(RuntimeError, match="query heads must be a multiple of kv heads"):
        run_compiled(paged, query, [5], 0.125, -1, 0.0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        run_compiled(paged, torch.randn(1, 4, 64).to(torch.bfloat16), [5], 0.125, -1, 0.0)


def test_decode_attention_with_a_huge_score_range() -> None:
    """Scores far below the maximum (e^-1000) must weigh 0, not wrap the exponent around."""
    block_size, heads, kv_heads, head_size = 16, 4, 2, 64
    seq_lens = [40, 7]
    paged = build_paged_kv(seq_lens, kv_heads, head_size, block_size, torch.float32)
    query = torch.randn(2, heads, head_size) * 300
    out = run_compiled(paged, query, seq_lens, 0.125, -1, 0.0)
    assert_close_to(out, expected_decode(paged, query, seq_lens, 0.125, -1, 0.0), torch.float32)
