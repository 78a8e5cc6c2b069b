"""The compiled provider's kernels (vllm_kunlun/ops/csrc/) against the plain formulas and the
reference kernels, over the shapes, dtypes, layouts, windows and soft-caps the reference is
tested with; and how the provider is chosen.
(The norm and KV-write kernels also run the reference kernels' own tests:
tests/test_compiled_row_ops.py.)"""

import pytest
import torch

from tests.test_reference_kernels import (
    ATTENTION_CASES,
    DTYPES,
    HEAD_SIZE_FOR_BLOCK,
    ROTARY_SHAPES,
    WINDOW_SOFTCAP,
    PagedKV,
    assert_close_to,
    build_paged_kv,
    decode_seq_lens,
    expected_decode,
    make_cos_sin_cache,
    plain_rms_norm,
    plain_rotary,
    run_decode,
)
from vllm_kunlun.ops import compiled_provider, provider, reference
from vllm_kunlun.ops.compiled_provider import CompiledProvider
from vllm_kunlun.ops.provider import ReferenceProvider, choose_provider


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def run_compiled(
    paged: PagedKV, query: torch.Tensor, seq_lens: list[int], scale: float,
    sliding_window: int, softcap: float, out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    out = torch.full_like(query, float("nan")) if out is None else out
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    CompiledProvider.decode_attention(
        out, query, paged.key_cache, paged.value_cache, paged.block_table, lens, lens,
        max(seq_lens), 4096, scale, sliding_window, softcap,
    )  # fmt: skip
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("block_size", "heads", "kv_heads"), ATTENTION_CASES)
def test_decode_attention(dtype: torch.dtype, block_size: int, heads: int, kv_heads: int) -> None:
    head_size = HEAD_SIZE_FOR_BLOCK[block_size]
    seq_lens = decode_seq_lens(block_size)
    paged = build_paged_kv(seq_lens, kv_heads, head_size, block_size, dtype)
    query = torch.randn(len(seq_lens), heads, head_size).to(dtype)
    scale = head_size**-0.5

    out = run_compiled(paged, query, seq_lens, scale, -1, 0.0)

    assert_close_to(out, expected_decode(paged, query, seq_lens, scale, -1, 0.0), dtype)
    assert_close_to(out, run_decode(paged, query, seq_lens, scale, -1, 0.0).double(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("sliding_window", "softcap"), WINDOW_SOFTCAP)
def test_decode_attention_sliding_window_and_softcap(
    dtype: torch.dtype, sliding_window: int, softcap: float
) -> None:
    block_size, heads, kv_heads, head_size = 16, 9, 3, 72  # head size not a multiple of 16
    seq_lens = [1, 7, 8, 33, 61]
    paged = build_paged_kv(seq_lens, kv_heads, head_size, block_size, dtype)
    query = (torch.randn(len(seq_lens), heads, head_size) * 4).to(dtype)  # large logits
    scale = head_size**-0.5

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


def test_row_ops_run_in_cpp_for_contiguous_inputs(monkeypatch) -> None:
    """test_compiled_row_ops.py could pass on the fallback alone: the C++ path takes these."""
    for name in ("rms_norm", "fused_add_rms_norm", "reshape_and_cache"):
        monkeypatch.setattr(ReferenceProvider, name, staticmethod(lambda *a, **k: 1 / 0))
    x, residual, weight = torch.randn(3, 100), torch.randn(3, 100), torch.rand(100) + 0.5
    expected = plain_rms_norm(x, weight, 1e-6)
    assert_close_to(CompiledProvider.rms_norm(x, weight, 1e-6), expected, torch.float32)
    CompiledProvider.fused_add_rms_norm(x, residual, weight, 1e-6)
    with pytest.raises(ZeroDivisionError):  # float16 rows are sent to the reference
        CompiledProvider.rms_norm(x.half(), weight.half(), 1e-6)
    key, cache = torch.randn(2, 2, 64), torch.zeros(4, 2, 16, 64)
    CompiledProvider.reshape_and_cache(key, key, cache, cache.clone(), torch.tensor([17, 2]))
    assert torch.equal(cache[1, :, 1], key[0]) and torch.equal(cache[0, :, 2], key[1])


def test_row_ops_refuse_what_they_cannot_take() -> None:
    kernels = compiled_provider.load_kernels()
    x = torch.randn(4, 100)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        kernels.rms_norm(x[:, :50], torch.ones(50), 1e-6)
    with pytest.raises(RuntimeError, match="share a dtype"):
        kernels.rms_norm(x, torch.ones(100, dtype=torch.float64), 1e-6)
    with pytest.raises(RuntimeError, match="slot_mapping must be contiguous int64"):
        cache = torch.zeros(2, 2, 16, 64)
        kernels.reshape_and_cache(torch.randn(1, 2, 64), torch.randn(1, 2, 64), cache,
                                  cache.clone(), torch.tensor([0], dtype=torch.int32))  # fmt: skip


# Rotary embedding ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("num_tokens", [1, 17])
@pytest.mark.parametrize("shape", ROTARY_SHAPES, ids=lambda s: "h{}kv{}d{}rot{}".format(*s))
def test_rotary_embedding_flat_query_and_key(
    dtype: torch.dtype, is_neox: bool, num_tokens: int, shape: tuple[int, int, int, int]
) -> None:
    heads, kv_heads, head_size, rotary_dim = shape
    cache = make_cos_sin_cache(4096, rotary_dim, dtype)
    positions = torch.randint(0, 4096, (num_tokens,))
    query = torch.randn(num_tokens, heads * head_size).to(dtype)
    key = torch.randn(num_tokens, kv_heads * head_size).to(dtype)
    expected_query = plain_rotary(positions, query, head_size, cache, is_neox)
    expected_key = plain_rotary(positions, key, head_size, cache, is_neox)
    same_query, same_key = query.clone(), key.clone()
    reference.rotary_embedding(positions, same_query, same_key, head_size, cache, is_neox)

    CompiledProvider.rotary_embedding(positions, query, key, head_size, cache, is_neox)

    assert_close_to(query, expected_query, dtype)
    assert_close_to(key, expected_key, dtype)
    # Same float32 arithmetic as the reference, so at most one rounding apart.
    assert_close_to(query, same_query.double(), dtype)
    assert_close_to(key, same_key.double(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_rotary_embedding_on_fused_qkv_views_and_3d_query(dtype: torch.dtype, is_neox: bool):
    """Column slices of one qkv tensor (partial rotary): writes land in those columns only."""
    num_tokens, heads, kv_heads, head_size, rotary_dim = 33, 6, 2, 80, 40
    q_width, kv_width = heads * head_size, kv_heads * head_size
    cache = make_cos_sin_cache(2048, rotary_dim, dtype)
    positions = torch.randint(0, 2048, (num_tokens,))
    qkv = torch.randn(num_tokens, q_width + 2 * kv_width).to(dtype)
    query, key = qkv[:, :q_width], qkv[:, q_width : q_width + kv_width]
    qkv_in = qkv.clone()
    expected_query = plain_rotary(positions, query, head_size, cache, is_neox)
    expected_key = plain_rotary(positions, key, head_size, cache, is_neox)

    CompiledProvider.rotary_embedding(positions, query, key, head_size, cache, is_neox)

    assert_close_to(qkv[:, :q_width], expected_query, dtype)
    assert_close_to(qkv[:, q_width : q_width + kv_width], expected_key, dtype)
    assert torch.equal(qkv[:, q_width + kv_width :], qkv_in[:, q_width + kv_width :])

    query3d = torch.randn(num_tokens, heads, head_size).to(dtype)
    expected = plain_rotary(positions, query3d, head_size, cache, is_neox)
    CompiledProvider.rotary_embedding(positions, query3d, None, head_size, cache, is_neox)
    assert query3d.shape == (num_tokens, heads, head_size)
    assert_close_to(query3d, expected, dtype)


# Choosing the provider ---------------------------------------------------------------------


def test_auto_compiles_when_a_compiler_exists_and_reference_is_kept_on_request(monkeypatch):
    monkeypatch.setattr(provider, "kunlun_library_available", lambda: False)
    monkeypatch.setenv("VLLM_KUNLUN_KERNELS", "auto")
    assert type(choose_provider()) is CompiledProvider
    monkeypatch.setenv("VLLM_KUNLUN_KERNELS", "reference")
    assert type(choose_provider()) is ReferenceProvider


def test_without_a_compiler_auto_uses_the_reference_and_compiled_says_what_to_do(monkeypatch):
    monkeypatch.setattr(provider, "kunlun_library_available", lambda: False)
    monkeypatch.setattr(compiled_provider, "compiler_available", lambda: False)
    monkeypatch.setenv("VLLM_KUNLUN_KERNELS", "auto")
    assert type(choose_provider()) is ReferenceProvider
    monkeypatch.setenv("VLLM_KUNLUN_KERNELS", "compiled")
    needs = "needs a C\\+\\+ compiler.*VLLM_KUNLUN_KERNELS=reference"
    with pytest.raises(RuntimeError, match=needs):
        choose_provider()


def test_the_build_is_cached_per_source_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_KUNLUN_CACHE_DIR", str(tmp_path))
    first = compiled_provider.build_directory()
    assert first.parent == tmp_path / "kernels"
    monkeypatch.setattr(compiled_provider, "_cpu_flags", lambda: "flags : other cpu")
    assert compiled_provider.build_directory() != first
