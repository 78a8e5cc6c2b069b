"""The reference kernels (vllm_kunlun.ops.reference) against plain formulas, and the torch custom
ops (torch.ops.kunlun.*) that wrap them.

Every expected value is computed here from the definition, in float64, with loops where that is
clearer than vectorization; the kernels are vectorized, so the two share no code. Attention reads
a paged KV cache whose blocks are scattered over a larger pool full of garbage, so any mistake in
paging, masking or head grouping shows up as a large error.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from torch.library import opcheck

import vllm_kunlun.ops.library  # noqa: F401  (registers torch.ops.kunlun.*)
from vllm_kunlun.ops import reference, stats
from vllm_kunlun.ops.provider import ReferenceProvider, current_provider

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    # One or two roundings to the output dtype on values of order 1.
    torch.float32: {"rtol": 2e-5, "atol": 2e-5},
    torch.float16: {"rtol": 3e-3, "atol": 3e-3},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
}
NUM_TOKENS = [1, 3, 17, 33]
BLOCK_SIZES = [16, 32, 64, 128]
HEAD_LAYOUTS = [(4, 4), (9, 3), (8, 1)]  # (query heads, kv heads): MHA, GQA 3:1, MQA
HEAD_SIZE_FOR_BLOCK = {16: 80, 32: 64, 64: 128, 128: 64}


@pytest.fixture(autouse=True)
def _seed_and_one_thread() -> Iterator[None]:
    """Deterministic inputs; one intra-op thread, since these tensors are tiny and a second
    thread only adds contention on a busy 2-core machine (several times slower)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def reference_ops(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """torch.ops.kunlun.* backed by the reference provider, whatever an earlier test chose."""
    monkeypatch.setenv("VLLM_KUNLUN_KERNELS", "reference")
    current_provider.cache_clear()
    assert isinstance(current_provider(), ReferenceProvider)
    yield
    current_provider.cache_clear()  # the next user chooses again, under its own environment


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected.double(), **TOLERANCES[dtype])


# Plain formulas -----------------------------------------------------------------------------


def plain_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x64, w64 = x.double(), weight.double()
    mean_square = (x64 * x64).sum(dim=-1, keepdim=True) / x.shape[-1]
    return x64 / torch.sqrt(mean_square + eps) * w64


def plain_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    gate, up = x[..., :half].double(), x[..., half:].double()
    return gate / (1.0 + torch.exp(-gate)) * up


def make_cos_sin_cache(
    max_position: int, rotary_dim: int, dtype: torch.dtype, base: float = 10000.0
) -> torch.Tensor:
    """[max_position, rotary_dim] = [cos | sin], the layout vLLM's RotaryEmbedding builds."""
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype)


def plain_rotary(
    positions: torch.Tensor,
    x: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> torch.Tensor:
    """x [T, heads * head_size] -> rotated copy in float64: each feature pair, seen as a complex
    number, is multiplied by exp(i * angle) taken from the cache row of its token's position."""
    rotary_dim = cos_sin_cache.shape[-1]
    half = rotary_dim // 2
    pairs = [(j, j + half) if is_neox else (2 * j, 2 * j + 1) for j in range(half)]
    first, second = [a for a, _ in pairs], [b for _, b in pairs]
    out = x.double().reshape(x.shape[0], -1, head_size).clone()
    for token, position in enumerate(positions.tolist()):
        row = cos_sin_cache[position].double()
        turn = torch.complex(row[:half], row[half:])  # exp(i * angle_j), j < rotary_dim / 2
        z = torch.complex(out[token][:, first], out[token][:, second]) * turn  # [heads, half]
        out[token][:, first], out[token][:, second] = z.real, z.imag
    return out.reshape(x.shape)


def plain_attention(
    query: torch.Tensor,
    positions: list[int],
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    sliding_window: int,
    softcap: float,
) -> torch.Tensor:
    """query [Q, H, D] at absolute `positions`; keys/values [S, Hkv, D] of the whole sequence.

    Query head h reads kv head h // (H / Hkv); the query at position p sees keys 0..p, or only
    p - sliding_window + 1..p when sliding_window > 0. Returns [Q, H, D] in float64.
    """
    num_heads, kv_heads = query.shape[1], keys.shape[1]
    group = num_heads // kv_heads
    out = torch.zeros(query.shape, dtype=torch.float64)
    for row, position in enumerate(positions):
        first = max(0, position - sliding_window + 1) if sliding_window > 0 else 0
        for head in range(num_heads):
            k = keys[first : position + 1, head // group].double()  # [visible, D]
            v = values[first : position + 1, head // group].double()
            scores = (k @ query[row, head].double()) * scale
            if softcap > 0:
                scores = softcap * torch.tanh(scores / softcap)
            weights = torch.exp(scores - scores.max())
            out[row, head] = (weights / weights.sum()) @ v
    return out


# Paged KV cache built by hand ----------------------------------------------------------------


@dataclass
class PagedKV:
    key_cache: torch.Tensor  # [num_blocks, Hkv, block_size, D]
    value_cache: torch.Tensor
    block_table: torch.Tensor  # [R, width] int32
    keys: list[torch.Tensor]  # per request, [seq_len, Hkv, D], the values written to the cache
    values: list[torch.Tensor]


def build_paged_kv(
    seq_lens: list[int], kv_heads: int, head_size: int, block_size: int, dtype: torch.dtype
) -> PagedKV:
    """Per-request dense K/V, written by direct assignment into blocks scattered over a pool.

    Spare blocks, the tail of each request's last block and the padding columns of the block
    table (which point at random blocks, as stale entries do) all hold large garbage.
    """
    blocks_needed = [-(-length // block_size) for length in seq_lens]
    num_blocks = sum(blocks_needed) + 5
    shape = (num_blocks, kv_heads, block_size, head_size)
    key_cache = (torch.randn(shape) * 30).to(dtype)
    value_cache = (torch.randn(shape) * 30).to(dtype)
    width = max(blocks_needed) + 2
    block_table = torch.randint(0, num_blocks, (len(seq_lens), width), dtype=torch.int32)
    pool = torch.randperm(num_blocks).tolist()  # non-monotonic placement
    keys, values = [], []
    for request, length in enumerate(seq_lens):
        k = torch.randn(length, kv_heads, head_size).to(dtype)
        v = torch.randn(length, kv_heads, head_size).to(dtype)
        for index in range(blocks_needed[request]):
            block = pool.pop()
            block_table[request, index] = block
            start = index * block_size
            stop = min(start + block_size, length)
            key_cache[block, :, : stop - start] = k[start:stop].transpose(0, 1)
            value_cache[block, :, : stop - start] = v[start:stop].transpose(0, 1)
        keys.append(k)
        values.append(v)
    return PagedKV(key_cache, value_cache, block_table, keys, values)


# RMS norm --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("hidden", [576, 100])
# 1e-3: mean(x^2) ~ eps, so eps matters; 300: x^2 overflows float16 unless upcast first.
@pytest.mark.parametrize("x_scale", [1.0, 1e-3, 300.0])
def test_rms_norm(dtype: torch.dtype, num_tokens: int, hidden: int, x_scale: float) -> None:
    eps = 1e-6
    x = (torch.randn(num_tokens, hidden) * x_scale).to(dtype)
    weight = (torch.rand(hidden) + 0.5).to(dtype)
    x_before = x.clone()
    out = reference.rms_norm(x, weight, eps)
    assert_close_to(out, plain_rms_norm(x, weight, eps), dtype)
    assert torch.equal(x, x_before)  # not in place


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_3d_and_strided_input(dtype: torch.dtype) -> None:
    eps = 1e-5
    weight = torch.randn(100).to(dtype)
    x3 = torch.randn(2, 3, 100).to(dtype)
    assert_close_to(reference.rms_norm(x3, weight, eps), plain_rms_norm(x3, weight, eps), dtype)
    wide = torch.randn(5, 300).to(dtype)
    x = wide[:, 100:200]  # non-contiguous column slice
    assert_close_to(reference.rms_norm(x, weight, eps), plain_rms_norm(x, weight, eps), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("hidden", [576, 100])
def test_fused_add_rms_norm(dtype: torch.dtype, num_tokens: int, hidden: int) -> None:
    eps = 1e-6
    x = torch.randn(num_tokens, hidden).to(dtype)
    residual = torch.randn(num_tokens, hidden).to(dtype)
    weight = (torch.rand(hidden) + 0.5).to(dtype)
    x_in, residual_in = x.clone(), residual.clone()
    x_ptr, residual_ptr = x.data_ptr(), residual.data_ptr()

    assert reference.fused_add_rms_norm(x, residual, weight, eps) is None

    assert (x.data_ptr(), residual.data_ptr()) == (x_ptr, residual_ptr)
    expected_residual = x_in.double() + residual_in.double()
    assert_close_to(residual, expected_residual, dtype)
    # The norm is of the new residual as stored (rounded to dtype), like vLLM's kernels.
    assert_close_to(x, plain_rms_norm(residual, weight, eps), dtype)
    # And, within tolerance, of the exact sum.
    assert_close_to(x, plain_rms_norm(expected_residual, weight, eps), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_on_views_writes_only_the_views(dtype: torch.dtype) -> None:
    eps = 1e-6
    hidden = 100
    x_buffer = torch.randn(7, 3 * hidden).to(dtype)
    residual_buffer = torch.randn(9, hidden).to(dtype)
    x = x_buffer[:, hidden : 2 * hidden]  # non-contiguous
    residual = residual_buffer[1:8]  # contiguous slice inside a larger buffer
    weight = torch.randn(hidden).to(dtype)
    x_buffer_in, residual_buffer_in = x_buffer.clone(), residual_buffer.clone()
    x_in, residual_in = x.clone(), residual.clone()

    reference.fused_add_rms_norm(x, residual, weight, eps)

    assert torch.equal(x_buffer[:, :hidden], x_buffer_in[:, :hidden])
    assert torch.equal(x_buffer[:, 2 * hidden :], x_buffer_in[:, 2 * hidden :])
    assert torch.equal(residual_buffer[[0, 8]], residual_buffer_in[[0, 8]])
    assert_close_to(residual, x_in.double() + residual_in.double(), dtype)
    assert_close_to(x_buffer[:, hidden : 2 * hidden], plain_rms_norm(residual, weight, eps), dtype)


# SiLU and mul ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("width", [100, 576, 1])
def test_silu_and_mul(dtype: torch.dtype, num_tokens: int, width: int) -> None:
    x = (torch.randn(num_tokens, 2 * width) * 3).to(dtype)
    x_before = x.clone()
    out = reference.silu_and_mul(x)
    assert out.shape == (num_tokens, width)
    assert_close_to(out, plain_silu_and_mul(x), dtype)
    assert torch.equal(x, x_before)


def test_silu_and_mul_is_not_symmetric_in_its_halves() -> None:
    """Guards the test above: swapping gate and up would be caught."""
    x = torch.randn(3, 2 * 8, dtype=torch.float64)
    swapped = torch.cat([x[:, 8:], x[:, :8]], dim=-1)
    out = reference.silu_and_mul(x)
    torch.testing.assert_close(out, plain_silu_and_mul(x))
    assert not torch.allclose(out, plain_silu_and_mul(swapped))


def test_silu_and_mul_leading_dims() -> None:
    x = torch.randn(2, 3, 2 * 100)
    assert_close_to(reference.silu_and_mul(x), plain_silu_and_mul(x), torch.float32)


# Rotary embedding --------------------------------------------------------------------------


ROTARY_SHAPES = [  # (heads, kv heads, head_size, rotary_dim)
    (4, 2, 64, 64),
    (3, 1, 80, 32),  # partial rotary
    (2, 2, 128, 64),  # partial rotary
    (5, 5, 128, 128),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("num_tokens", [1, 17])
@pytest.mark.parametrize("shape", ROTARY_SHAPES, ids=lambda s: "h{}kv{}d{}rot{}".format(*s))
def test_rotary_embedding_flat_query_and_key(
    dtype: torch.dtype, is_neox: bool, num_tokens: int, shape: tuple[int, int, int, int]
) -> None:
    heads, kv_heads, head_size, rotary_dim = shape
    max_position = 4096
    cache = make_cos_sin_cache(max_position, rotary_dim, dtype)
    positions = torch.randint(0, max_position, (num_tokens,))
    query = torch.randn(num_tokens, heads * head_size).to(dtype)
    key = torch.randn(num_tokens, kv_heads * head_size).to(dtype)
    expected_query = plain_rotary(positions, query, head_size, cache, is_neox)
    expected_key = plain_rotary(positions, key, head_size, cache, is_neox)
    query_in, key_in = query.clone(), key.clone()

    assert reference.rotary_embedding(positions, query, key, head_size, cache, is_neox) is None

    assert_close_to(query, expected_query, dtype)
    assert_close_to(key, expected_key, dtype)
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
    heads, kv_heads, head_size, rotary_dim = 6, 2, 80, 40
    q_width, kv_width = heads * head_size, kv_heads * head_size
    cache = make_cos_sin_cache(2048, rotary_dim, dtype)
    positions = torch.randint(0, 2048, (num_tokens,))
    qkv = torch.randn(num_tokens, q_width + 2 * kv_width).to(dtype)
    query, key = qkv[:, :q_width], qkv[:, q_width : q_width + kv_width]
    assert not query.is_contiguous() and not key.is_contiguous()
    qkv_in = qkv.clone()
    expected_query = plain_rotary(positions, query, head_size, cache, is_neox)
    expected_key = plain_rotary(positions, key, head_size, cache, is_neox)

    reference.rotary_embedding(positions, query, key, head_size, cache, is_neox)

    assert_close_to(qkv[:, :q_width], expected_query, dtype)
    assert_close_to(qkv[:, q_width : q_width + kv_width], expected_key, dtype)
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


# reshape_and_cache ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("num_tokens", [1, 17, 33])
def test_reshape_and_cache(dtype: torch.dtype, block_size: int, num_tokens: int) -> None:
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

    reference.reshape_and_cache(key, value, key_cache, value_cache, slots)

    # Exact: written slots hold the tokens, every other byte of the cache is unchanged.
    assert torch.equal(key_cache, expected_key)
    assert torch.equal(value_cache, expected_value)


def test_reshape_and_cache_only_padding_changes_nothing() -> None:
    key = torch.randn(3, 2, 64)
    key_cache = torch.randn(2, 2, 16, 64)
    value_cache = torch.randn(2, 2, 16, 64)
    before = key_cache.clone(), value_cache.clone()
    reference.reshape_and_cache(key, key, key_cache, value_cache, torch.full((3,), -1))
    assert torch.equal(key_cache, before[0]) and torch.equal(value_cache, before[1])


def test_reshape_and_cache_from_fused_qkv_views_with_int32_slots() -> None:
    num_tokens, kv_heads, head_size, block_size = 5, 2, 64, 16
    qkv = torch.randn(num_tokens, (4 + 2 * kv_heads) * head_size)
    key = qkv[:, 4 * head_size : (4 + kv_heads) * head_size].view(num_tokens, kv_heads, head_size)
    value = qkv[:, (4 + kv_heads) * head_size :].view(num_tokens, kv_heads, head_size)
    key_cache = torch.zeros(3, kv_heads, block_size, head_size)
    value_cache = torch.zeros(3, kv_heads, block_size, head_size)
    slots = torch.tensor([47, 0, -1, 16, 15], dtype=torch.int32)
    reference.reshape_and_cache(key, value, key_cache, value_cache, slots)
    for token, (block, offset) in {0: (2, 15), 1: (0, 0), 3: (1, 0), 4: (0, 15)}.items():
        assert torch.equal(key_cache[block, :, offset], key[token])
        assert torch.equal(value_cache[block, :, offset], value[token])
    assert int((key_cache != 0).any(dim=-1).sum()) == 4 * kv_heads


# Attention -------------------------------------------------------------------------------------


ATTENTION_CASES = [
    pytest.param(block_size, heads, kv_heads, id=f"bs{block_size}-h{heads}kv{kv_heads}")
    for block_size in BLOCK_SIZES
    for heads, kv_heads in HEAD_LAYOUTS
]


def decode_seq_lens(block_size: int) -> list[int]:
    """Odd lengths, a single token, and lengths at and just past block boundaries."""
    return [1, 17, 33, block_size, block_size + 1, 2 * block_size + 3]


def run_decode(
    paged: PagedKV,
    query: torch.Tensor,
    seq_lens: list[int],
    scale: float,
    sliding_window: int,
    softcap: float,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    out = torch.full_like(query, float("nan"))
    reference.decode_attention(
        out, query, paged.key_cache, paged.value_cache, paged.block_table,
        torch.tensor(seq_lens, dtype=torch.int32), max_seq_len or max(seq_lens),
        scale, sliding_window, softcap,
    )  # fmt: skip
    return out


def expected_decode(
    paged: PagedKV,
    query: torch.Tensor,
    seq_lens: list[int],
    scale: float,
    sliding_window: int,
    softcap: float,
) -> torch.Tensor:
    rows = [
        plain_attention(
            query[request : request + 1],
            [length - 1],
            paged.keys[request],
            paged.values[request],
            scale,
            sliding_window,
            softcap,
        )  # fmt: skip
        for request, length in enumerate(seq_lens)
    ]
    return torch.cat(rows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("block_size", "heads", "kv_heads"), ATTENTION_CASES)
def test_decode_attention(dtype: torch.dtype, block_size: int, heads: int, kv_heads: int) -> None:
    head_size = HEAD_SIZE_FOR_BLOCK[block_size]
    seq_lens = decode_seq_lens(block_size)
    paged = build_paged_kv(seq_lens, kv_heads, head_size, block_size, dtype)
    query = torch.randn(len(seq_lens), heads, head_size).to(dtype)
    scale = head_size**-0.5

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

    reference.decode_attention(
        out, query, paged.key_cache, paged.value_cache, paged.block_table,
        torch.tensor(seq_lens, dtype=torch.int32), max(seq_lens), 0.125, -1, 0.0,
    )  # fmt: skip

    assert torch.equal(qkv, qkv_in)
    assert torch.equal(buffer[[0, requests + 1]], buffer_in[[0, requests + 1]])
    expected = expected_decode(paged, query, seq_lens, 0.125, -1, 0.0)
    assert_close_to(buffer[1 : requests + 1], expected, torch.float32)


WINDOW_SOFTCAP = [(1, 0.0), (7, 0.0), (50, 0.0), (-1, 5.0), (7, 5.0), (1000, 30.0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("sliding_window", "softcap"), WINDOW_SOFTCAP)
def test_decode_attention_sliding_window_and_softcap(
    dtype: torch.dtype, sliding_window: int, softcap: float
) -> None:
    block_size, heads, kv_heads, head_size = 16, 9, 3, 80
    seq_lens = [1, 7, 8, 33, 61]
    paged = build_paged_kv(seq_lens, kv_heads, head_size, block_size, dtype)
    query = (torch.randn(len(seq_lens), heads, head_size) * 4).to(dtype)  # large logits
    scale = head_size**-0.5

    out = run_decode(paged, query, seq_lens, scale, sliding_window, softcap)

    expected = expected_decode(paged, query, seq_lens, scale, sliding_window, softcap)
    assert_close_to(out, expected, dtype)
    if 0 < sliding_window < max(seq_lens) or softcap > 0:  # the feature changed the answer
        plain = expected_decode(paged, query, seq_lens, scale, -1, 0.0)
        assert (expected - plain).abs().max() > 0.1


# A batch in the order vLLM builds it: (cached context, new tokens) per request.
PREFILL_BATCH = [
    (0, 17),  # fresh prompt
    (40, 33),  # chunked prefill: earlier chunk cached, next chunk new
    (150, 3),  # prefix-cache hit: long cached prefix, short new suffix
    (70, 1),  # one new token (decode-like) in the prefill batch
    (0, 1),  # one-token prompt
    (5, 20),  # short context, longer chunk
]


def run_prefill(
    paged: PagedKV,
    query: torch.Tensor,
    batch: list[tuple[int, int]],
    scale: float,
    sliding_window: int,
    softcap: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    query_lens = [new for _, new in batch]
    seq_lens = [context + new for context, new in batch]
    query_start_loc = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()])
    if out is None:
        out = torch.full(query.shape, float("nan"), dtype=query.dtype)
    reference.prefill_attention(
        out, query, paged.key_cache, paged.value_cache, paged.block_table,
        query_start_loc.to(torch.int32), torch.tensor(seq_lens, dtype=torch.int32),
        max(query_lens), max(seq_lens), scale, sliding_window, softcap,
    )  # fmt: skip
    return out


def expected_prefill(
    paged: PagedKV,
    query: torch.Tensor,
    batch: list[tuple[int, int]],
    scale: float,
    sliding_window: int,
    softcap: float,
) -> torch.Tensor:
    rows, start = [], 0
    for request, (context, new) in enumerate(batch):
        positions = list(range(context, context + new))
        rows.append(
            plain_attention(
                query[start : start + new],
                positions,
                paged.keys[request],
                paged.values[request],
                scale,
                sliding_window,
                softcap,
            )  # fmt: skip
        )
        start += new
    return torch.cat(rows)


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
        reference.reshape_and_cache(key, value, key_cache, value_cache, torch.tensor(slots))

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


# The custom ops ---------------------------------------------------------------------------------


def attention_op_inputs(dtype: torch.dtype = torch.float32) -> dict[str, object]:
    """Small decode and prefill problems, with every argument the custom ops take."""
    block_size, heads, kv_heads, head_size = 16, 9, 3, 64
    batch = [(0, 5), (20, 3), (17, 1)]
    seq_lens = [context + new for context, new in batch]
    paged = build_paged_kv(seq_lens, kv_heads, head_size, block_size, dtype)
    query_lens = torch.tensor([new for _, new in batch])
    query_start_loc = torch.cat([torch.zeros(1), query_lens.cumsum(0)]).to(torch.int32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    seq_start_loc = torch.cat([torch.zeros(1), seq_lens_t.cumsum(0)]).to(torch.int32)
    return {
        "paged": paged,
        "decode_query": torch.randn(len(seq_lens), heads, head_size).to(dtype),
        "prefill_query": torch.randn(int(query_lens.sum()), heads, head_size).to(dtype),
        "seq_lens": seq_lens_t,
        "query_start_loc": query_start_loc,
        "seq_start_loc": seq_start_loc,
        "max_query_len": int(query_lens.max()),
        "max_seq_len": max(seq_lens),
    }


def decode_op_args(inputs: dict, out: torch.Tensor, window: int, softcap: float) -> tuple:
    paged: PagedKV = inputs["paged"]
    seq_lens = inputs["seq_lens"]
    return (
        out, inputs["decode_query"], paged.key_cache, paged.value_cache, paged.block_table,
        seq_lens, seq_lens.clone(), inputs["max_seq_len"], 4096, 0.125, window, softcap,
    )  # fmt: skip


def prefill_op_args(inputs: dict, out: torch.Tensor, window: int, softcap: float) -> tuple:
    paged: PagedKV = inputs["paged"]
    return (
        out, inputs["prefill_query"], paged.key_cache, paged.value_cache, paged.block_table,
        inputs["query_start_loc"], inputs["query_start_loc"].clone(), inputs["seq_lens"],
        inputs["seq_start_loc"], inputs["seq_start_loc"].clone(), inputs["max_query_len"],
        inputs["max_seq_len"], 0.125, window, softcap,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_match_reference_norm_activation_rotary(
    reference_ops: None, dtype: torch.dtype
) -> None:
    x = torch.randn(17, 576).to(dtype)
    weight = torch.randn(576).to(dtype)
    assert torch.equal(
        torch.ops.kunlun.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6)
    )

    residual = torch.randn(17, 576).to(dtype)
    x_op, residual_op = x.clone(), residual.clone()
    x_ref, residual_ref = x.clone(), residual.clone()
    assert torch.ops.kunlun.fused_add_rms_norm(x_op, residual_op, weight, 1e-6) is None
    reference.fused_add_rms_norm(x_ref, residual_ref, weight, 1e-6)
    assert torch.equal(x_op, x_ref) and torch.equal(residual_op, residual_ref)
    assert not torch.equal(x_op, x)  # it did write in place

    gate_up = torch.randn(3, 200).to(dtype)
    assert torch.equal(torch.ops.kunlun.silu_and_mul(gate_up), reference.silu_and_mul(gate_up))

    for is_neox in (True, False):
        cache = make_cos_sin_cache(256, 32, dtype)
        positions = torch.randint(0, 256, (17,))
        qkv = torch.randn(17, 9 * 80).to(dtype)
        qkv_ref = qkv.clone()
        torch.ops.kunlun.rotary_embedding(
            positions, qkv[:, :480], qkv[:, 480:560], 80, cache, is_neox
        )
        reference.rotary_embedding(
            positions, qkv_ref[:, :480], qkv_ref[:, 480:560], 80, cache, is_neox
        )
        assert torch.equal(qkv, qkv_ref)
        query_op, query_ref = qkv[:, :480].clone(), qkv[:, :480].clone()
        torch.ops.kunlun.rotary_embedding(positions, query_op, None, 80, cache, is_neox)
        reference.rotary_embedding(positions, query_ref, None, 80, cache, is_neox)
        assert torch.equal(query_op, query_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_match_reference_kv_cache_and_attention(
    reference_ops: None, dtype: torch.dtype
) -> None:
    key, value = torch.randn(2, 5, 3, 64).to(dtype).unbind(0)
    caches = torch.randn(2, 4, 3, 16, 64).to(dtype)
    slots = torch.tensor([3, -1, 40, 17, 63])
    op_caches, ref_caches = caches.clone(), caches.clone()
    torch.ops.kunlun.reshape_and_cache(key, value, op_caches[0], op_caches[1], slots)
    reference.reshape_and_cache(key, value, ref_caches[0], ref_caches[1], slots)
    assert torch.equal(op_caches, ref_caches) and not torch.equal(op_caches, caches)

    inputs = attention_op_inputs(dtype)
    paged: PagedKV = inputs["paged"]
    for window, softcap in [(-1, 0.0), (4, 10.0)]:
        out_op = torch.zeros_like(inputs["decode_query"])
        out_ref = torch.zeros_like(out_op)
        torch.ops.kunlun.decode_attention(*decode_op_args(inputs, out_op, window, softcap))
        reference.decode_attention(
            out_ref, inputs["decode_query"], paged.key_cache, paged.value_cache,
            paged.block_table, inputs["seq_lens"], inputs["max_seq_len"], 0.125, window, softcap,
        )  # fmt: skip
        assert torch.equal(out_op, out_ref) and out_op.abs().sum() > 0

        out_op = torch.zeros_like(inputs["prefill_query"])
        out_ref = torch.zeros_like(out_op)
        torch.ops.kunlun.prefill_attention(*prefill_op_args(inputs, out_op, window, softcap))
        reference.prefill_attention(
            out_ref, inputs["prefill_query"], paged.key_cache, paged.value_cache,
            paged.block_table, inputs["query_start_loc"], inputs["seq_lens"],
            inputs["max_query_len"], inputs["max_seq_len"], 0.125, window, softcap,
        )  # fmt: skip
        assert torch.equal(out_op, out_ref) and out_op.abs().sum() > 0


def op_samples() -> dict[str, tuple]:
    """One valid argument tuple per torch.ops.kunlun op (fresh tensors on every call)."""
    cache = make_cos_sin_cache(64, 32, torch.float32)
    positions, slots = torch.randint(0, 64, (3,)), torch.tensor([5, -1, 60])
    inputs = attention_op_inputs()
    return {
        "rms_norm": (torch.randn(3, 100), torch.randn(100), 1e-6),
        "fused_add_rms_norm": (torch.randn(3, 100), torch.randn(3, 100), torch.randn(100), 1e-6),
        "silu_and_mul": (torch.randn(3, 200),),
        # query [T, 4 heads * 64] and key [T, 2 heads * 64]
        "rotary_embedding": (positions, torch.randn(3, 256), torch.randn(3, 128), 64, cache, True),
        # two tokens into a 4-block cache, one padding token
        "reshape_and_cache": (*torch.randn(2, 3, 2, 64), *torch.zeros(2, 4, 2, 16, 64), slots),
        "decode_attention": decode_op_args(
            inputs, torch.empty_like(inputs["decode_query"]), -1, 0.0
        ),
        "prefill_attention": prefill_op_args(
            inputs, torch.empty_like(inputs["prefill_query"]), 8, 20.0
        ),
        "gelu_and_mul": (torch.randn(3, 200), "tanh"),
        # 4 query heads over 2 kv heads of 64, sequences of 3 and 1 tokens
        "encoder_attention": (
            torch.empty(4, 4, 64),
            torch.randn(4, 4, 64),
            *torch.randn(2, 4, 2, 64),
            torch.tensor([0, 3, 4]),
            torch.tensor([0, 3, 4]),
            3,
            0.125,
        ),  # fmt: skip
    }


OPCHECK_CASES = [
    "rms_norm",
    "fused_add_rms_norm",
    "silu_and_mul",
    "rotary_embedding",
    "reshape_and_cache",
    "decode_attention",
    "prefill_attention",
    "gelu_and_mul",
    "encoder_attention",
]


@pytest.mark.parametrize("name", OPCHECK_CASES)
def test_opcheck(reference_ops: None, name: str) -> None:
    """All of opcheck's default checks: schema (declared mutations), fake implementation,
    autograd registration and AOT dispatch."""
    opcheck(getattr(torch.ops.kunlun, name).default, op_samples()[name])


@pytest.mark.parametrize("is_neox", [True, False])
def test_opcheck_rotary_embedding_without_key(reference_ops: None, is_neox: bool) -> None:
    cache = make_cos_sin_cache(64, 16, torch.bfloat16)
    query = torch.randn(5, 3 * 32).to(torch.bfloat16)
    args = (torch.randint(0, 64, (5,)), query, None, 32, cache, is_neox)
    opcheck(torch.ops.kunlun.rotary_embedding.default, args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_opcheck_norms_and_activation_low_precision(
    reference_ops: None, dtype: torch.dtype
) -> None:
    x, residual = torch.randn(2, 2, 3, 100).to(dtype).unbind(0)
    weight = torch.randn(100).to(dtype)
    opcheck(torch.ops.kunlun.rms_norm.default, (x, weight, 1e-5))
    opcheck(torch.ops.kunlun.fused_add_rms_norm.default, (x, residual, weight, 1e-5))
    opcheck(torch.ops.kunlun.silu_and_mul.default, (torch.randn(2, 3, 200).to(dtype),))


# Fake and real implementations must agree on dtype and strides in these corner cases too
# (both once disagreed). Only test_faketensor is about that; the other checks run above.


def test_opcheck_rms_norm_with_float32_weight(reference_ops: None) -> None:
    x, weight = torch.randn(3, 16).to(torch.bfloat16), torch.randn(16)
    opcheck(torch.ops.kunlun.rms_norm.default, (x, weight, 1e-6), test_utils=("test_faketensor",))


def test_opcheck_silu_and_mul_transposed_input(reference_ops: None) -> None:
    x = torch.randn(64, 3).t()
    opcheck(torch.ops.kunlun.silu_and_mul.default, (x,), test_utils=("test_faketensor",))


@pytest.mark.parametrize("name", OPCHECK_CASES)
def test_each_op_call_is_counted_once(reference_ops: None, name: str) -> None:
    args = op_samples()[name]
    before = stats.snapshot()
    getattr(torch.ops.kunlun, name)(*args)
    after = stats.snapshot()
    assert after.get(name, 0) == before.get(name, 0) + 1
    assert {k: v for k, v in after.items() if k != name} == {
        k: v for k, v in before.items() if k != name
    }
    getattr(torch.ops.kunlun, name)(*op_samples()[name])
    assert stats.snapshot().get(name, 0) == before.get(name, 0) + 2


def test_reference_calls_are_not_counted() -> None:
    """Only the torch.ops.kunlun entry points count; the kernels themselves do not."""
    before = stats.snapshot()
    reference.rms_norm(torch.randn(2, 8), torch.randn(8), 1e-6)
    reference.silu_and_mul(torch.randn(2, 8))
    assert stats.snapshot() == before
