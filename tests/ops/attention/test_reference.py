"""The attention family's reference kernels (vllm_kunlun/ops/attention/reference.py) against the
plain formula (float64, loops; the kernels are vectorized, so the two share no code): paged
decode and prefill attention over a scattered cache (GQA/MQA, mixed batches, sliding windows,
soft-caps), the path the backend takes (write with reshape_and_cache, then attend), and the
cache-free bidirectional encoder attention."""

import pytest
import torch

from tests.ops.attention.shared import (
    ATTENTION_CASES,
    HEAD_LAYOUTS,
    HEAD_SIZE_FOR_BLOCK,
    PREFILL_BATCH,
    WINDOW_SOFTCAP,
    PagedKV,
    build_paged_kv,
    decode_problem,
    expected_decode,
    expected_prefill,
    lod,
    plain_attention,
    run_decode,
    run_prefill,
    window_softcap_decode_problem,
)
from tests.ops.helpers import DTYPES, assert_close_to
from vllm_kunlun.ops.attention import reference
from vllm_kunlun.ops.kv_cache import reference as kv_cache_reference

pytestmark = pytest.mark.usefixtures("one_thread")


# Decode ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("block_size", "heads", "kv_heads"), ATTENTION_CASES)
def test_decode_attention(dtype: torch.dtype, block_size: int, heads: int, kv_heads: int) -> None:
    paged, query, seq_lens, scale = decode_problem(dtype, block_size, heads, kv_heads)

    out = run_decode(paged, query, seq_lens, scale, -1, 0.0)

    assert_close_to(out, expected_decode(paged, query, seq_lens, scale, -1, 0.0), dtype)


def test_decode_attention_max_seq_len_may_be_an_upper_bound() -> None:
    """Metadata may pass an upper bound of the lengths; the result must not depend on it."""
    block_size, heads, kv_heads, head_size = 16, 9, 3, 64
    seq_lens = [5, 20, 31]
    paged = build_paged_kv(seq_lens, kv_heads, head_size, block_size, torch.float32)
    query = torch.randn(len(seq_lens), heads, head_size)
    exact = run_decode(paged, query, seq_lens, 0.125, -1, 0.0)
    bound = paged.block_table.shape[1] * block_size
    loose = run_decode(paged, query, seq_lens, 0.125, -1, 0.0, max_seq_len=bound)
    torch.testing.assert_close(loose, exact)
    assert_close_to(loose, expected_decode(paged, query, seq_lens, 0.125, -1, 0.0), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("sliding_window", "softcap"), [(-1, 0.0), (50, 0.0), (9, 0.0), (-1, 5.0)])
def test_decode_attention_when_every_request_has_the_same_length(
    dtype: torch.dtype, sliding_window: int, softcap: float
) -> None:
    """The common batch shape (prompts of one length decoding together) skips the mask unless a
    window hides keys; stale slots after the last token of the last block must stay unseen."""
    block_size, heads, kv_heads, head_size = 16, 9, 3, 64
    seq_lens = [37] * 4  # 3 of 16 slots used in each last block
    paged = build_paged_kv(seq_lens, kv_heads, head_size, block_size, dtype)
    query = torch.randn(len(seq_lens), heads, head_size).to(dtype)
    out = run_decode(paged, query, seq_lens, 0.125, sliding_window, softcap)
    expected = expected_decode(paged, query, seq_lens, 0.125, sliding_window, softcap)
    assert_close_to(out, expected, dtype)


def test_decode_attention_strided_query_and_output_slice() -> None:
    """query as a view of a fused qkv tensor; out as a slice of a larger output buffer."""
    block_size, heads, kv_heads, head_size = 32, 9, 3, 64
    seq_lens = [7, 40, 65]
    requests = len(seq_lens)
    paged = build_paged_kv(seq_lens, kv_heads, head_size, block_size, torch.float32)
    qkv = torch.randn(requests, (heads + 2 * kv_heads) * head_size)
    query = qkv[:, : heads * head_size].view(requests, heads, head_size)
    assert not query.is_contiguous()
    buffer = torch.randn(requests + 2, heads, head_size)
    buffer_in, qkv_in = buffer.clone(), qkv.clone()
    out = buffer[1 : requests + 1]
    lens = torch.tensor(seq_lens, dtype=torch.int32)

    reference.decode_attention(
        out, query, paged.key_cache, paged.value_cache, paged.block_table, lens, lens.clone(),
        max(seq_lens), 4096, 0.125, -1, 0.0,
    )  # fmt: skip

    assert torch.equal(qkv, qkv_in)
    assert torch.equal(buffer[[0, requests + 1]], buffer_in[[0, requests + 1]])
    expected = expected_decode(paged, query, seq_lens, 0.125, -1, 0.0)
    assert_close_to(buffer[1 : requests + 1], expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("sliding_window", "softcap"), WINDOW_SOFTCAP)
def test_decode_attention_sliding_window_and_softcap(
    dtype: torch.dtype, sliding_window: int, softcap: float
) -> None:
    paged, query, seq_lens, scale = window_softcap_decode_problem(dtype, head_size=80)

    out = run_decode(paged, query, seq_lens, scale, sliding_window, softcap)

    expected = expected_decode(paged, query, seq_lens, scale, sliding_window, softcap)
    assert_close_to(out, expected, dtype)
    if 0 < sliding_window < max(seq_lens) or softcap > 0:  # the feature changed the answer
        plain = expected_decode(paged, query, seq_lens, scale, -1, 0.0)
        assert (expected - plain).abs().max() > 0.1


# Prefill ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("block_size", "heads", "kv_heads"), ATTENTION_CASES)
def test_prefill_attention_mixed_batch(
    dtype: torch.dtype, block_size: int, heads: int, kv_heads: int
) -> None:
    head_size = HEAD_SIZE_FOR_BLOCK[block_size]
    seq_lens = [context + new for context, new in PREFILL_BATCH]
    paged = build_paged_kv(seq_lens, kv_heads, head_size, block_size, dtype)
    num_tokens = sum(new for _, new in PREFILL_BATCH)
    query = torch.randn(num_tokens, heads, head_size).to(dtype)
    scale = head_size**-0.5

    out = run_prefill(paged, query, PREFILL_BATCH, scale, -1, 0.0)

    expected = expected_prefill(paged, query, PREFILL_BATCH, scale, -1, 0.0)
    assert_close_to(out, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("sliding_window", "softcap"), WINDOW_SOFTCAP)
def test_prefill_attention_sliding_window_and_softcap(
    dtype: torch.dtype, sliding_window: int, softcap: float
) -> None:
    block_size, heads, kv_heads, head_size = 32, 8, 1, 64
    seq_lens = [context + new for context, new in PREFILL_BATCH]
    paged = build_paged_kv(seq_lens, kv_heads, head_size, block_size, dtype)
    num_tokens = sum(new for _, new in PREFILL_BATCH)
    query = (torch.randn(num_tokens, heads, head_size) * 4).to(dtype)
    scale = head_size**-0.5

    out = run_prefill(paged, query, PREFILL_BATCH, scale, sliding_window, softcap)

    expected = expected_prefill(paged, query, PREFILL_BATCH, scale, sliding_window, softcap)
    assert_close_to(out, expected, dtype)
    if 0 < sliding_window < max(seq_lens) or softcap > 0:
        plain = expected_prefill(paged, query, PREFILL_BATCH, scale, -1, 0.0)
        assert (expected - plain).abs().max() > 0.1


def test_prefill_attention_strided_query_and_output_slice() -> None:
    block_size, heads, kv_heads, head_size = 16, 9, 3, 80
    batch = [(0, 3), (20, 17), (33, 1)]
    seq_lens = [context + new for context, new in batch]
    paged = build_paged_kv(seq_lens, kv_heads, head_size, block_size, torch.float32)
    num_tokens = sum(new for _, new in batch)
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_size)
    query = qkv[:, : heads * head_size].view(num_tokens, heads, head_size)
    buffer = torch.randn(num_tokens + 4, heads, head_size)
    buffer_in, qkv_in = buffer.clone(), qkv.clone()

    run_prefill(paged, query, batch, 0.1, -1, 0.0, out=buffer[3 : 3 + num_tokens])

    assert torch.equal(qkv, qkv_in)
    outside = [0, 1, 2, num_tokens + 3]
    assert torch.equal(buffer[outside], buffer_in[outside])
    expected = expected_prefill(paged, query, batch, 0.1, -1, 0.0)
    assert_close_to(buffer[3 : 3 + num_tokens], expected, torch.float32)


# The path the backend takes ----------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [16, 128])
def test_attention_over_cache_filled_by_reshape_and_cache(block_size: int) -> None:
    """The path the backend takes: write new K/V with reshape_and_cache, then attend.

    Step 1 prefills two prompts (one chunked), step 2 decodes one token for each, with slots
    derived from a shuffled block table and padding tokens (slot -1) mixed in.
    """
    heads, kv_heads, head_size, dtype = 9, 3, 64, torch.bfloat16
    prompt_lens, chunk = [19, 150], 100  # the second prompt is prefilled as 100 + 50
    total_lens = [length + 1 for length in prompt_lens]
    width = max(-(-n // block_size) for n in total_lens)
    num_blocks = 2 * width + 4  # spare blocks stay as garbage
    shape = (num_blocks, kv_heads, block_size, head_size)
    key_cache, value_cache = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    block_table = torch.randperm(num_blocks)[: 2 * width].view(2, width).to(torch.int32)
    keys = [torch.randn(n, kv_heads, head_size).to(dtype) for n in total_lens]
    values = [torch.randn(n, kv_heads, head_size).to(dtype) for n in total_lens]
    scale = head_size**-0.5

    def slot(request: int, position: int) -> int:
        block = int(block_table[request, position // block_size])
        return block * block_size + position % block_size

    def write(spans: list[tuple[int, int, int]]) -> None:
        """spans of (request, start, stop) tokens, with a padding token after each span."""
        token_keys, token_values, slots = [], [], []
        for request, start, stop in spans:
            token_keys += [keys[request][start:stop], torch.randn(1, kv_heads, head_size)]
            token_values += [values[request][start:stop], torch.randn(1, kv_heads, head_size)]
            slots += [slot(request, p) for p in range(start, stop)] + [-1]
        key = torch.cat(token_keys).to(dtype)
        value = torch.cat(token_values).to(dtype)
        kv_cache_reference.reshape_and_cache(key, value, key_cache, value_cache,
                                             torch.tensor(slots))  # fmt: skip

    # Step 0: the first chunk of the long prompt. Step 1: the short prompt + the second chunk.
    write([(1, 0, chunk)])
    write([(0, 0, prompt_lens[0]), (1, chunk, prompt_lens[1])])
    batch = [(0, prompt_lens[0]), (chunk, prompt_lens[1] - chunk)]
    query = torch.randn(sum(new for _, new in batch), heads, head_size).to(dtype)
    paged = PagedKV(key_cache, value_cache, block_table, keys, values)
    out = run_prefill(paged, query, batch, scale, -1, 0.0)
    assert_close_to(out, expected_prefill(paged, query, batch, scale, -1, 0.0), dtype)

    # Step 2: one decode token per request.
    write([(0, prompt_lens[0], total_lens[0]), (1, prompt_lens[1], total_lens[1])])
    query = torch.randn(2, heads, head_size).to(dtype)
    out = run_decode(paged, query, total_lens, scale, -1, 0.0)
    assert_close_to(out, expected_decode(paged, query, total_lens, scale, -1, 0.0), dtype)


def test_attention_ignores_non_finite_values_outside_the_sequence() -> None:
    block_size, heads, kv_heads, head_size = 16, 4, 2, 64
    seq_lens = [5]
    paged = build_paged_kv(seq_lens, kv_heads, head_size, block_size, torch.float32)
    block = int(paged.block_table[0, 0])
    paged.value_cache[block, :, seq_lens[0] :] = float("nan")  # past the end of the sequence
    query = torch.randn(1, heads, head_size)
    out = run_decode(paged, query, seq_lens, 0.125, -1, 0.0)
    assert_close_to(out, expected_decode(paged, query, seq_lens, 0.125, -1, 0.0), torch.float32)


# Encoder attention: every token of a packed sequence attends to every token of its own sequence
# and to nothing else ----------------------------------------------------------------------------

ENCODER_LENGTHS = [[1], [5, 1, 33], [17, 64, 2, 2]]  # one token; mixed; padding-heavy batches
ENCODER_HEAD_SIZES = [32, 80]


def packed_qkv(
    lengths: list[int], heads: int, kv_heads: int, head_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as views of one fused projection, as the model hands them over."""
    total = sum(lengths)
    fused = torch.randn(total, (heads + 2 * kv_heads) * head_size).to(dtype)
    q, k, v = fused.split([heads * head_size, kv_heads * head_size, kv_heads * head_size], -1)
    return (q.view(total, heads, head_size), k.view(total, kv_heads, head_size),
            v.view(total, kv_heads, head_size))  # fmt: skip


def plain_encoder(q, k, v, lengths: list[int], scale: float) -> torch.Tensor:
    """Sequence by sequence: the last position sees every key, so ask plain_attention for it at
    every query row."""
    outputs, start = [], 0
    for length in lengths:
        rows = slice(start, start + length)
        outputs.append(plain_attention(q[rows], [length - 1] * length, k[rows], v[rows],
                                       scale, -1, 0.0))  # fmt: skip
        start += length
    return torch.cat(outputs)


def run_encoder(q, k, v, lengths: list[int], scale: float) -> torch.Tensor:
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    starts = lod(lengths)
    reference.encoder_attention(out, q, k, v, starts, starts.clone(), max(lengths), scale)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths", ENCODER_LENGTHS, ids=str)
@pytest.mark.parametrize("heads,kv_heads", HEAD_LAYOUTS)
@pytest.mark.parametrize("head_size", ENCODER_HEAD_SIZES)
def test_encoder_attention_matches_the_formula(dtype, lengths, heads, kv_heads, head_size):
    torch.manual_seed(0)
    q, k, v = packed_qkv(lengths, heads, kv_heads, head_size, dtype)
    scale = head_size**-0.5
    expected = plain_encoder(q, k, v, lengths, scale)
    assert_close_to(run_encoder(q, k, v, lengths, scale), expected, dtype)


def test_the_first_token_sees_the_last_and_sequences_do_not_mix():
    torch.manual_seed(0)
    lengths = [6, 4]
    q, k, v = packed_qkv(lengths, 4, 2, 32, torch.float32)
    before = run_encoder(q, k, v, lengths, 0.2)
    k[5], v[5] = k[5] * 3, v[5] + 1  # the last token of the first sequence
    after = run_encoder(q, k, v, lengths, 0.2)
    assert not torch.allclose(after[0], before[0]), "attention must look ahead (bidirectional)"
    torch.testing.assert_close(after[6:], before[6:])  # the second sequence is untouched


def test_an_empty_batch_writes_nothing():
    out = torch.zeros(0, 4, 32)
    empty = torch.zeros(0, 4, 32)
    starts = torch.tensor([0])
    reference.encoder_attention(out, empty, empty, empty, starts, starts.clone(), 0, 0.1)
    assert out.shape == (0, 4, 32)
