"""The MLA family's reference kernels (vllm_kunlun/ops/mla/reference.py) against attention as the
model defines it: per-head keys and values up-projected from the latent rows, plain softmax per
head (float64, loops; tests/ops/mla/shared.py). Absorbed decode must give the latent output whose
up-projection is that attention; prefill must match the per-request (bottom-right causal)
formula and its log-sum-exp; a context chunk and the new tokens merged through their
log-sum-exps must equal attention over all keys at once; the cache write and gather must move
exactly the right rows and nothing else.

The tests take the kernels from the `kernels` fixture, so another provider's tests can collect
them a second time with its kernels.
"""

from types import ModuleType

import pytest
import torch

from tests.ops.helpers import DTYPES, TOLERANCES, assert_close_to
from tests.ops.mla.shared import (
    BLOCK_SIZES,
    LATENT_SHAPES,
    LatentCache,
    absorbed_query,
    assert_close_in,
    build_latent_cache,
    causal_visible,
    decode_args,
    full_keys_values,
    lod,
    make_projections,
    plain_attention,
    prefill_args,
    up_project,
)
from vllm_kunlun.ops.mla import reference

pytestmark = pytest.mark.usefixtures("one_thread")

#: lse is float32 whatever the dtype, computed from the same rounded inputs as the expectation.
LSE_TOLERANCE = {"rtol": 1e-5, "atol": 1e-4}


@pytest.fixture
def kernels() -> ModuleType:
    """The kernels under test (the reference's)."""
    return reference


# concat_and_cache_mla --------------------------------------------------------------------------


def expected_cache_write(kv_cache, kv_c, k_pe, slots: list[int]) -> torch.Tensor:
    expected = kv_cache.clone()
    block_size = kv_cache.shape[1]
    for token, slot in enumerate(slots):
        if slot >= 0:
            block, offset = divmod(slot, block_size)
            expected[block, offset] = torch.cat([kv_c[token], k_pe[token]])
    return expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize(("kv_lora_rank", "rope_dims"), [(32, 16), (64, 32), (512, 64)])
@pytest.mark.parametrize("num_tokens", [1, 17])
def test_concat_and_cache_mla(kernels, dtype, block_size, kv_lora_rank, rope_dims, num_tokens):
    num_blocks = 6
    kv_c = torch.randn(num_tokens, kv_lora_rank).to(dtype)
    k_pe = torch.randn(num_tokens, rope_dims).to(dtype)
    kv_cache = torch.randn(num_blocks, block_size, kv_lora_rank + rope_dims).to(dtype)
    # Block boundaries first (last slot of block 0, first of block 1, the pool's last slot),
    # then distinct random slots; every third token after the first is padding (-1).
    boundary = [block_size - 1, block_size, num_blocks * block_size - 1]
    rest = [s for s in torch.randperm(num_blocks * block_size).tolist() if s not in boundary]
    slots = (boundary + rest)[:num_tokens]
    for token in range(2, num_tokens, 3):
        slots[token] = -1
    expected = expected_cache_write(kv_cache, kv_c, k_pe, slots)

    kernels.concat_and_cache_mla(kv_c, k_pe, kv_cache, torch.tensor(slots))

    # Exact: written slots hold [kv_c | k_pe], every other row of the cache is unchanged.
    assert torch.equal(kv_cache, expected)


def test_concat_and_cache_mla_padding_only_or_no_tokens_changes_nothing(kernels) -> None:
    kv_cache = torch.randn(3, 16, 48)
    before = kv_cache.clone()
    kv_c, k_pe = torch.randn(4, 32), torch.randn(4, 16)
    kernels.concat_and_cache_mla(kv_c, k_pe, kv_cache, torch.full((4,), -1))
    assert torch.equal(kv_cache, before)
    kernels.concat_and_cache_mla(kv_c[:0], k_pe[:0], kv_cache, torch.zeros(0, dtype=torch.long))
    assert torch.equal(kv_cache, before)


def test_concat_and_cache_mla_from_a_fused_projection_with_int32_slots(kernels) -> None:
    """kv_c and k_pe as column views of the kv_a projection's output [T, L + R + extra]."""
    num_tokens, kv_lora_rank, rope_dims, block_size = 5, 64, 32, 16
    fused = torch.randn(num_tokens, 8 + kv_lora_rank + rope_dims).to(torch.bfloat16)
    kv_c, k_pe = fused[:, 8 : 8 + kv_lora_rank], fused[:, 8 + kv_lora_rank :]
    assert not kv_c.is_contiguous() and not k_pe.is_contiguous()
    fused_in = fused.clone()
    kv_cache = torch.zeros(3, block_size, kv_lora_rank + rope_dims, dtype=torch.bfloat16)
    slots = torch.tensor([47, 0, -1, 16, 15], dtype=torch.int32)

    kernels.concat_and_cache_mla(kv_c, k_pe, kv_cache, slots)

    assert torch.equal(fused, fused_in)
    for token, (block, offset) in {0: (2, 15), 1: (0, 0), 3: (1, 0), 4: (0, 15)}.items():
        assert torch.equal(kv_cache[block, offset, :kv_lora_rank], kv_c[token])
        assert torch.equal(kv_cache[block, offset, kv_lora_rank:], k_pe[token])
    assert int((kv_cache != 0).any(dim=-1).sum()) == 4


# mla_decode: absorbed attention over the latent rows == attention over the full keys/values -----


def decode_seq_lens(block_size: int) -> list[int]:
    """A single token, odd lengths, lengths at and just past block boundaries."""
    return [1, 5, block_size - 1, block_size, block_size + 1, 2 * block_size + 3]


def check_decode(kernels, dtype, cache, seq_lens, q_nope, q_pe, proj, scale, out=None):
    """Run mla_decode on the absorbed query and compare with the model's attention."""
    kv_lora_rank = cache.latent[0].shape[1]
    query = absorbed_query(q_nope, q_pe, proj).to(dtype)
    if out is None:
        out = torch.full((len(seq_lens), proj.heads, kv_lora_rank), float("nan"), dtype=dtype)

    kernels.mla_decode(*decode_args(out, query, cache, seq_lens, kv_lora_rank, scale))

    assert out.dtype == dtype
    expected_out, expected_latent = [], []
    for request, length in enumerate(seq_lens):
        keys, values = full_keys_values(cache.latent[request], cache.k_pe[request], proj)
        q = torch.cat([q_nope[request], q_pe[request].double()], dim=-1)[None]  # [1, H, P + R]
        full, _ = plain_attention(q, keys, values, [length], scale)
        expected_out.append(full)
        # The same softmax weights over the latent rows themselves: what o must be.
        rows = cache.latent[request].double()[:, None].expand(-1, proj.heads, -1)
        latent, _ = plain_attention(q, keys, rows, [length], scale)
        expected_latent.append(latent)
    # (a) the model's output: o up-projected per head equals attention over the full K/V.
    assert_close_in(up_project(out, proj), torch.cat(expected_out), dtype)
    # and o itself is those attention weights applied to the latent rows.
    assert_close_in(out, torch.cat(expected_latent), dtype)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize(("kv_lora_rank", "rope_dims", "nope_dims", "v_dims", "heads"),
                         LATENT_SHAPES)  # fmt: skip
def test_mla_decode_is_attention_over_the_up_projected_keys_and_values(
    kernels, dtype, block_size, kv_lora_rank, rope_dims, nope_dims, v_dims, heads
):
    seq_lens = decode_seq_lens(block_size)
    cache = build_latent_cache(seq_lens, kv_lora_rank, rope_dims, block_size, dtype)
    proj = make_projections(heads, kv_lora_rank, nope_dims, v_dims)
    q_nope = torch.randn(len(seq_lens), heads, nope_dims, dtype=torch.float64)
    q_pe = torch.randn(len(seq_lens), heads, rope_dims).to(dtype)

    check_decode(
        kernels, dtype, cache, seq_lens, q_nope, q_pe, proj, (nope_dims + rope_dims) ** -0.5
    )


def test_mla_decode_with_many_heads_and_one_request(kernels) -> None:
    """DeepSeek-V3's shape with 16 heads (a TP share of 128), one request of one token."""
    dtype, seq_lens = torch.bfloat16, [1]
    cache = build_latent_cache(seq_lens, 512, 64, 64, dtype)
    proj = make_projections(16, 512, 128, 128)
    q_nope = torch.randn(1, 16, 128, dtype=torch.float64)
    q_pe = torch.randn(1, 16, 64).to(dtype)
    out = check_decode(kernels, dtype, cache, seq_lens, q_nope, q_pe, proj, 192**-0.5)
    # one visible row: every head's output is that row's latent part
    assert torch.equal(out[0], cache.latent[0].expand(16, -1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_mla_decode_ignores_nan_in_rows_past_each_sequence_end(kernels, dtype) -> None:
    """The whole pool is NaN but for the requests' rows: the tails of last blocks, spare blocks
    and the blocks the table's unused columns point at must never leak into the output."""
    block_size, kv_lora_rank, rope_dims, nope_dims, heads = 16, 64, 32, 48, 4
    seq_lens = [1, 5, 16, 17, 40]
    cache = build_latent_cache(seq_lens, kv_lora_rank, rope_dims, block_size, dtype,
                               garbage=float("nan"))  # fmt: skip
    assert cache.kv_cache.isnan().any()
    proj = make_projections(heads, kv_lora_rank, nope_dims, 32)
    q_nope = torch.randn(len(seq_lens), heads, nope_dims, dtype=torch.float64)
    q_pe = torch.randn(len(seq_lens), heads, rope_dims).to(dtype)
    out = check_decode(kernels, dtype, cache, seq_lens, q_nope, q_pe, proj, 0.1)
    assert out.isfinite().all()


def test_mla_decode_strided_query_and_output_slice(kernels) -> None:
    """query as a view of a wider buffer; out as a slice of a larger output; neither the rest
    of the output buffer nor the query is written."""
    dtype, block_size, kv_lora_rank, rope_dims, nope_dims, heads = torch.float32, 16, 64, 32, 48, 4
    seq_lens = [3, 33, 20]
    requests = len(seq_lens)
    cache = build_latent_cache(seq_lens, kv_lora_rank, rope_dims, block_size, dtype)
    proj = make_projections(heads, kv_lora_rank, nope_dims, 40)
    q_nope = torch.randn(requests, heads, nope_dims, dtype=torch.float64)
    q_pe = torch.randn(requests, heads, rope_dims)
    wide = torch.randn(requests, heads, kv_lora_rank + rope_dims + 8)
    query = wide[..., 8:]
    query.copy_(absorbed_query(q_nope, q_pe, proj))
    assert not query.is_contiguous()
    wide_in = wide.clone()
    buffer = torch.randn(requests + 2, heads, kv_lora_rank)
    buffer_in = buffer.clone()
    out = buffer[1 : requests + 1]

    kernels.mla_decode(*decode_args(out, query, cache, seq_lens, kv_lora_rank, 0.1))

    assert torch.equal(wide, wide_in)
    assert torch.equal(buffer[[0, requests + 1]], buffer_in[[0, requests + 1]])
    expected = check_decode(kernels, dtype, cache, seq_lens, q_nope, q_pe, proj, 0.1)
    torch.testing.assert_close(buffer[1 : requests + 1], expected)


# mla_prefill: non-absorbed attention, request by request ---------------------------------------


def prefill_problem(batch, kv_lora_rank, rope_dims, nope_dims, v_dims, heads, dtype):
    """(query_len, key_len) per request -> q [T, H, P + R], k [S, H, P + R], v [S, H, V] in
    `dtype`, built the model's way: keys and values up-projected from random latent rows."""
    proj = make_projections(heads, kv_lora_rank, nope_dims, v_dims)
    num_keys = sum(keys for _, keys in batch)
    latent = torch.randn(num_keys, kv_lora_rank).to(dtype)
    k_pe = torch.randn(num_keys, rope_dims).to(dtype)
    key, value = full_keys_values(latent, k_pe, proj)
    num_queries = sum(queries for queries, _ in batch)
    query = torch.randn(num_queries, heads, nope_dims + rope_dims)
    return query.to(dtype), key.to(dtype), value.to(dtype)


def expected_prefill(query, key, value, batch, scale, causal):
    """The plain formula per request: (out [T, H, V], lse [H, T]), float64."""
    outs, lses = [], []
    q_start = k_start = 0
    for queries, keys in batch:
        visible = causal_visible(queries, keys) if causal else [keys] * queries
        out, lse = plain_attention(query[q_start : q_start + queries],
                                   key[k_start : k_start + keys], value[k_start : k_start + keys],
                                   visible, scale)  # fmt: skip
        outs.append(out)
        lses.append(lse)
        q_start, k_start = q_start + queries, k_start + keys
    return torch.cat(outs), torch.cat(lses, dim=1)


def run_prefill(kernels, query, key, value, batch, scale, causal, with_lse=True):
    num_queries, heads = query.shape[:2]
    out = torch.full((num_queries, heads, value.shape[-1]), float("nan"), dtype=query.dtype)
    lse = torch.full((heads, num_queries), float("nan")) if with_lse else None
    query_lens, key_lens = [q for q, _ in batch], [k for _, k in batch]
    kernels.mla_prefill(*prefill_args(out, lse, query, key, value, query_lens, key_lens, scale,
                                      causal))  # fmt: skip
    return out, lse


# (query_len, key_len) per request, the way vLLM's MLA prefill calls it.
CAUSAL_BATCH = [(1, 1), (17, 17), (16, 16), (5, 40), (1, 33), (3, 3)]  # fresh, chunk after context
CONTEXT_BATCH = [(4, 30), (1, 1), (17, 5), (2, 64)]  # new tokens against a cached context chunk


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("kv_lora_rank", "rope_dims", "nope_dims", "v_dims", "heads"),
                         LATENT_SHAPES)  # fmt: skip
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "context"])
def test_mla_prefill_matches_the_formula_and_its_lse(
    kernels, dtype, kv_lora_rank, rope_dims, nope_dims, v_dims, heads, causal
):
    batch = CAUSAL_BATCH if causal else CONTEXT_BATCH
    query, key, value = prefill_problem(batch, kv_lora_rank, rope_dims, nope_dims, v_dims, heads,
                                        dtype)  # fmt: skip
    scale = (nope_dims + rope_dims) ** -0.5

    out, lse = run_prefill(kernels, query, key, value, batch, scale, causal)

    expected_out, expected_lse = expected_prefill(query, key, value, batch, scale, causal)
    assert_close_to(out, expected_out, dtype)
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), expected_lse, **LSE_TOLERANCE)


def test_mla_prefill_without_lse_gives_the_same_output(kernels) -> None:
    query, key, value = prefill_problem(CAUSAL_BATCH, 64, 32, 48, 40, 4, torch.float32)
    with_lse, _ = run_prefill(kernels, query, key, value, CAUSAL_BATCH, 0.1, True)
    without, lse = run_prefill(kernels, query, key, value, CAUSAL_BATCH, 0.1, True, False)
    assert lse is None
    assert torch.equal(with_lse, without)


def test_mla_prefill_causal_aligns_the_last_query_with_the_last_key(kernels) -> None:
    """Changing key j must change exactly the queries that see it: query i of a request with
    T queries and S keys sees keys 0 .. i + S - T."""
    batch = [(5, 12)]
    query, key, value = prefill_problem(batch, 32, 16, 24, 20, 2, torch.float32)
    before, _ = run_prefill(kernels, query, key, value, batch, 0.2, True)
    for j in (7, 8, 11):  # seen by queries i >= j - 7
        changed = value.clone()
        changed[j] += 1.0
        after, _ = run_prefill(kernels, query, key, changed, batch, 0.2, True)
        moved = [(after[i] - before[i]).abs().max().item() > 1e-6 for i in range(5)]
        assert moved == [i >= j - 7 for i in range(5)], j


@pytest.mark.parametrize("dtype", DTYPES)
def test_mla_prefill_a_query_without_visible_keys_gets_zero_and_minus_inf(kernels, dtype):
    """A request with an empty context chunk (no keys; not causal), between two that have one,
    and a causal request with fewer keys than queries (its first queries see nothing)."""
    for batch, causal in ([(3, 5), (2, 0), (1, 4)], False), ([(4, 2), (1, 3)], True):
        query, key, value = prefill_problem(batch, 32, 16, 24, 20, 3, dtype)
        out, lse = run_prefill(kernels, query, key, value, batch, 0.2, causal)
        expected_out, expected_lse = expected_prefill(query, key, value, batch, 0.2, causal)
        blind = expected_lse[0].isinf()
        assert blind.sum() == 2, "the problem has two queries that see no key"
        assert torch.equal(out[blind], torch.zeros_like(out[blind]))
        assert (lse[:, blind] == float("-inf")).all()
        assert_close_to(out, expected_out, dtype)
        torch.testing.assert_close(lse.double(), expected_lse, **LSE_TOLERANCE)


# merge_attention_states ------------------------------------------------------------------------


def expected_merge(prefix_out, prefix_lse, suffix_out, suffix_lse):
    """The formula, float64, query by query and head by head."""
    num_tokens, heads = prefix_out.shape[:2]
    out = torch.zeros(prefix_out.shape, dtype=torch.float64)
    lse = torch.zeros(heads, num_tokens, dtype=torch.float64)
    for t in range(num_tokens):
        for h in range(heads):
            p, s = float(prefix_lse[h, t]), float(suffix_lse[h, t])
            if p == s == float("-inf"):
                lse[h, t] = float("-inf")
                continue
            top = max(p, s)
            wp, ws = torch.tensor(p - top).exp(), torch.tensor(s - top).exp()
            po, so = prefix_out[t, h].double(), suffix_out[t, h].double()
            out[t, h] = (wp * po + ws * so) / (wp + ws)
            lse[h, t] = top + torch.log(wp + ws)
    return out, lse


def run_merge(kernels, prefix_out, prefix_lse, suffix_out, suffix_lse, with_lse=True):
    out = torch.full_like(prefix_out, float("nan"))
    out_lse = torch.full_like(prefix_lse, float("nan")) if with_lse else None
    kernels.merge_attention_states(out, out_lse, prefix_out, prefix_lse, suffix_out, suffix_lse)
    return out, out_lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("num_tokens", "heads", "head_dim"), [(1, 1, 16), (13, 4, 128), (5, 16, 512)]
)
def test_merge_attention_states_matches_the_formula(kernels, dtype, num_tokens, heads, head_dim):
    prefix_out = torch.randn(num_tokens, heads, head_dim).to(dtype)
    suffix_out = torch.randn(num_tokens, heads, head_dim).to(dtype)
    # lse of any size, one side often dominating, and values exp() would overflow in float32
    prefix_lse = torch.randn(heads, num_tokens) * 5
    suffix_lse = torch.randn(heads, num_tokens) * 5
    prefix_lse[..., ::3] += 150.0

    out, out_lse = run_merge(kernels, prefix_out, prefix_lse, suffix_out, suffix_lse)

    expected_out, expected_lse = expected_merge(prefix_out, prefix_lse, suffix_out, suffix_lse)
    assert_close_to(out, expected_out, dtype)
    assert out_lse.dtype == torch.float32
    torch.testing.assert_close(out_lse.double(), expected_lse, **LSE_TOLERANCE)
    without, none = run_merge(kernels, prefix_out, prefix_lse, suffix_out, suffix_lse, False)
    assert none is None and torch.equal(without, out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_attention_states_with_empty_sides(kernels, dtype) -> None:
    """Token 0: both sides saw no key (0, -inf). Token 1: no prefix, token 2: no suffix (the
    other side, exactly). Token 3: both real."""
    heads, head_dim = 3, 32
    prefix_out = torch.randn(4, heads, head_dim).to(dtype)
    suffix_out = torch.randn(4, heads, head_dim).to(dtype)
    prefix_out[[0, 1]] = 0  # what mla_prefill writes for a query that sees no key
    suffix_out[[0, 2]] = 0
    prefix_lse, suffix_lse = torch.randn(heads, 4) * 3, torch.randn(heads, 4) * 3
    prefix_lse[:, [0, 1]] = float("-inf")
    suffix_lse[:, [0, 2]] = float("-inf")

    out, out_lse = run_merge(kernels, prefix_out, prefix_lse, suffix_out, suffix_lse)

    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert (out_lse[:, 0] == float("-inf")).all()
    assert torch.equal(out[1], suffix_out[1]) and torch.equal(out_lse[:, 1], suffix_lse[:, 1])
    assert torch.equal(out[2], prefix_out[2]) and torch.equal(out_lse[:, 2], prefix_lse[:, 2])
    expected_out, expected_lse = expected_merge(prefix_out, prefix_lse, suffix_out, suffix_lse)
    assert_close_to(out, expected_out, dtype)
    torch.testing.assert_close(out_lse.double(), expected_lse, **LSE_TOLERANCE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("kv_lora_rank", "rope_dims", "nope_dims", "v_dims", "heads"),
                         LATENT_SHAPES)  # fmt: skip
def test_context_and_new_tokens_merged_equal_attention_over_all_keys(
    kernels, dtype, kv_lora_rank, rope_dims, nope_dims, v_dims, heads
):
    """(c) Each request's keys split into a cached context (not causal: every new token sees all
    of it) and the new tokens (causal among themselves); merging the two parts through their
    lse equals one causal prefill over all keys, and the model's formula. A request without
    context takes the new-token part exactly."""
    # (new tokens, context) per request: also the context part's (query_len, key_len)
    batch = [(5, 30), (1, 0), (17, 17), (3, 64), (1, 1)]
    new_lens = [n for n, _ in batch]
    full_batch = [(n, n + c) for n, c in batch]
    query, key, value = prefill_problem(full_batch, kv_lora_rank, rope_dims, nope_dims, v_dims,
                                        heads, dtype)  # fmt: skip
    scale = (nope_dims + rope_dims) ** -0.5
    # Split each request's keys [context | new] into two packed sets.
    parts = {"context": ([], []), "new": ([], [])}
    start = 0
    for new, context in batch:
        for name, lo, hi in (("context", 0, context), ("new", context, context + new)):
            parts[name][0].append(key[start + lo : start + hi])
            parts[name][1].append(value[start + lo : start + hi])
        start += new + context
    context_k, context_v = (torch.cat(t) for t in parts["context"])
    new_k, new_v = (torch.cat(t) for t in parts["new"])

    context_out, context_lse = run_prefill(kernels, query, context_k, context_v, batch, scale,
                                           False)  # fmt: skip
    new_out, new_lse = run_prefill(kernels, query, new_k, new_v, [(n, n) for n in new_lens],
                                   scale, True)  # fmt: skip
    merged, merged_lse = run_merge(kernels, context_out, context_lse, new_out, new_lse)

    at_once, at_once_lse = run_prefill(kernels, query, key, value, full_batch, scale, True)
    expected_out, expected_lse = expected_prefill(query, key, value, full_batch, scale, True)
    assert_close_to(merged, expected_out, dtype)
    assert_close_to(at_once, expected_out, dtype)
    torch.testing.assert_close(merged_lse.double(), expected_lse, **LSE_TOLERANCE)
    torch.testing.assert_close(at_once_lse.double(), expected_lse, **LSE_TOLERANCE)
    no_context = slice(5, 6)  # the second request's one token
    assert (context_lse[:, no_context] == float("-inf")).all()
    assert torch.equal(merged[no_context], new_out[no_context])


# mla_gather_cache ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize(("kv_lora_rank", "rope_dims"), [(32, 16), (512, 64)])
def test_mla_gather_cache_returns_the_rows_at_the_requested_positions(
    kernels, dtype, block_size, kv_lora_rank, rope_dims
):
    """Ragged chunks of several requests' contexts, starting at 0, mid-block, the last slot of a
    block and a block boundary."""
    seq_starts = [0, 5, block_size - 1, block_size, 2 * block_size + 1]
    chunk_lens = [1, block_size + 2, 2, 2 * block_size, 3]
    seq_lens = [s + n + 3 for s, n in zip(seq_starts, chunk_lens, strict=True)]
    cache = build_latent_cache(seq_lens, kv_lora_rank, rope_dims, block_size, dtype)
    width = kv_lora_rank + rope_dims
    num_rows = sum(chunk_lens)
    out = torch.full((num_rows, width), float("nan"), dtype=dtype)
    token_to_seq = torch.tensor([r for r, n in enumerate(chunk_lens) for _ in range(n)],
                                dtype=torch.int32)  # fmt: skip

    kernels.mla_gather_cache(out, cache.kv_cache, cache.block_table, lod(chunk_lens),
                             token_to_seq, torch.tensor(seq_starts, dtype=torch.int32))  # fmt: skip

    expected = []
    for request, (first, count) in enumerate(zip(seq_starts, chunk_lens, strict=True)):
        for position in range(first, first + count):
            block = int(cache.block_table[request, position // block_size])
            expected.append(cache.kv_cache[block, position % block_size])
            # ... which is the row written for that position
            assert torch.equal(expected[-1][:kv_lora_rank], cache.latent[request][position])
    assert torch.equal(out, torch.stack(expected))


def test_mla_gather_cache_of_nothing_writes_nothing(kernels) -> None:
    cache = build_latent_cache([4], 32, 16, 16, torch.float32)
    out = torch.zeros(0, 48)
    kernels.mla_gather_cache(
        out,
        cache.kv_cache,
        cache.block_table,
        lod([0]),
        torch.zeros(0, dtype=torch.int32),
        torch.zeros(1, dtype=torch.int32),
    )
    assert out.shape == (0, 48)


# The path the MLA backend takes ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_the_backend_path_write_gather_chunked_prefill_then_decode(kernels, dtype, block_size):
    """Step 1 writes two prompts' latent rows (padding tokens mixed in) with concat_and_cache_mla.
    Step 2 prefills a new chunk of each: the cached context is gathered in two chunks
    (mla_gather_cache with nonzero seq_starts), up-projected, attended without a mask, merged
    chunk by chunk, then merged with the new tokens' causal attention. Step 3 writes one more
    token per request and decodes it absorbed. Each step against the model's formula."""
    kv_lora_rank, rope_dims, nope_dims, v_dims, heads = 64, 32, 48, 40, 4
    proj = make_projections(heads, kv_lora_rank, nope_dims, v_dims)
    scale = (nope_dims + rope_dims) ** -0.5
    context_lens, new_lens = [block_size + 3, 2 * block_size], [7, 1]
    total_lens = [c + n + 1 for c, n in zip(context_lens, new_lens, strict=True)]
    width = max(-(-n // block_size) for n in total_lens)
    num_blocks = 2 * width + 3
    kv_cache = torch.randn(num_blocks, block_size, kv_lora_rank + rope_dims).to(dtype) * 30
    block_table = torch.randperm(num_blocks)[: 2 * width].view(2, width).to(torch.int32)
    latent = [torch.randn(n, kv_lora_rank).to(dtype) for n in total_lens]
    k_pe = [torch.randn(n, rope_dims).to(dtype) for n in total_lens]

    def slot(request: int, position: int) -> int:
        block = int(block_table[request, position // block_size])
        return block * block_size + position % block_size

    def write(spans: list[tuple[int, int, int]]) -> None:
        """(request, start, stop) spans of tokens, a padding token after each."""
        c, pe, slots = [], [], []
        for request, start, stop in spans:
            c += [latent[request][start:stop], torch.randn(1, kv_lora_rank).to(dtype)]
            pe += [k_pe[request][start:stop], torch.randn(1, rope_dims).to(dtype)]
            slots += [slot(request, p) for p in range(start, stop)] + [-1]
        kernels.concat_and_cache_mla(torch.cat(c), torch.cat(pe), kv_cache, torch.tensor(slots))

    # Step 1: the contexts.
    write([(0, 0, context_lens[0]), (1, 0, context_lens[1])])

    # Step 2: the new chunks, over the context gathered in two chunks.
    q = torch.randn(sum(new_lens), heads, nope_dims + rope_dims).to(dtype)
    keys_values = [full_keys_values(latent[r], k_pe[r], proj) for r in range(2)]
    merged = merged_lse = None
    half = [n // 2 for n in context_lens]
    for starts, stops in ((0, 0), half), (half, context_lens):
        chunk = [b - a for a, b in zip(starts, stops, strict=True)]
        rows = torch.full((sum(chunk), kv_lora_rank + rope_dims), float("nan"), dtype=dtype)
        token_to_seq = torch.tensor([r for r, n in enumerate(chunk) for _ in range(n)],
                                    dtype=torch.int32)  # fmt: skip
        kernels.mla_gather_cache(rows, kv_cache, block_table, lod(chunk), token_to_seq,
                                 torch.tensor(starts, dtype=torch.int32))  # fmt: skip
        k, v = full_keys_values(rows[:, :kv_lora_rank], rows[:, kv_lora_rank:], proj)
        out, lse = run_prefill(
            kernels,
            q,
            k.to(dtype),
            v.to(dtype),
            list(zip(new_lens, chunk, strict=True)),
            scale,
            False,
        )
        if merged is None:
            merged, merged_lse = out, lse
        else:
            merged, merged_lse = run_merge(kernels, merged, merged_lse, out, lse)
    new_k = torch.cat([keys_values[r][0][context_lens[r] : context_lens[r] + new_lens[r]]
                       for r in range(2)]).to(dtype)  # fmt: skip
    new_v = torch.cat([keys_values[r][1][context_lens[r] : context_lens[r] + new_lens[r]]
                       for r in range(2)]).to(dtype)  # fmt: skip
    out, lse = run_prefill(kernels, q, new_k, new_v, [(n, n) for n in new_lens], scale, True)
    result, _ = run_merge(kernels, merged, merged_lse, out, lse)
    expected = []
    for r, start in ((0, 0), (1, new_lens[0])):
        seen = context_lens[r] + new_lens[r]
        keys, values = (t[:seen].to(dtype) for t in keys_values[r])
        visible = causal_visible(new_lens[r], seen)
        expected.append(plain_attention(q[start : start + new_lens[r]], keys, values, visible,
                                        scale)[0])  # fmt: skip
    # three roundings to dtype between the parts: twice the usual tolerance
    tolerance = {k: 2 * v for k, v in TOLERANCES[dtype].items()}
    torch.testing.assert_close(result.double(), torch.cat(expected), **tolerance)

    # Step 2 writes its new tokens; step 3 writes one decode token each and decodes it.
    write([(0, context_lens[0], context_lens[0] + new_lens[0]),
           (1, context_lens[1], context_lens[1] + new_lens[1])])  # fmt: skip
    write([(0, total_lens[0] - 1, total_lens[0]), (1, total_lens[1] - 1, total_lens[1])])
    cache = LatentCache(kv_cache, block_table, latent, k_pe)
    q_nope = torch.randn(2, heads, nope_dims, dtype=torch.float64)
    q_pe = torch.randn(2, heads, rope_dims).to(dtype)
    check_decode(kernels, dtype, cache, total_lens, q_nope, q_pe, proj, scale)
