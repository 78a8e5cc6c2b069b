"""check-kernels cases of the MLA family: DeepSeek-V2/V3's latent rows of 512 + 64 (the only
size the Kunlun kernels take) and smaller, odd ones; slots at block boundaries and padding slots
(-1) in the cache write; ragged lengths and lengths at block boundaries in decode; context
chunks gathered from nonzero starts; causal prefill with more keys than queries; strided keys and
values split out of the up-projection; merges where one side saw no key (lse -inf)."""

import torch

from vllm_kunlun.ops.check.case import (
    Case,
    block_table,
    cumulative,
    int_tensor,
    randn,
    wide_view,
)

NUM_BLOCKS_SPARE = 4
#: DeepSeek-V3: latent 512, rope 64, no-rope query/key 128 per head, value 128 per head.
DEEPSEEK = {"kv_lora_rank": 512, "rope_dims": 64}
DEEPSEEK_HEADS = {"nope_dims": 128, "v_dims": 128}


def _latent_cache(seq_lens, block_size, width, dtype, device, g):
    """A random pool of [blocks, block_size, L + R] rows and a block table over it."""
    blocks = sum(-(-n // block_size) for n in seq_lens) + NUM_BLOCKS_SPARE
    kv_cache = randn((blocks, block_size, width), dtype, device, g)
    return kv_cache, block_table(seq_lens, block_size, blocks, device, g)


def _write(slots: list[int] | None, tokens: int = 0, kv_lora_rank: int = 512,
           rope_dims: int = 64, block_size: int = 64, num_blocks: int = 32,
           strided: bool = False):  # fmt: skip
    """slots=None: `tokens` distinct random slots outside block 0. strided=True: kv_c and k_pe
    are column views of the kv_a projection's output, as the model splits it."""

    def make(dtype, device, g):
        if slots is None:
            drawn = torch.randperm((num_blocks - 1) * block_size, generator=g)[:tokens]
            chosen = (drawn + block_size).tolist()
        else:
            chosen = slots
        count = len(chosen)
        if strided:
            fused = randn((count, kv_lora_rank + rope_dims + 64), dtype, device, g)
            kv_c, k_pe = fused[:, :kv_lora_rank], fused[:, kv_lora_rank + 64 :]
        else:
            kv_c = randn((count, kv_lora_rank), dtype, device, g)
            k_pe = randn((count, rope_dims), dtype, device, g)
        kv_cache = randn((num_blocks, block_size, kv_lora_rank + rope_dims), dtype, device, g)
        slot_mapping = torch.tensor(chosen, dtype=torch.int64, device=device)
        return kv_c, k_pe, kv_cache, slot_mapping

    return make


def _decode(seq_lens, heads=16, kv_lora_rank=512, rope_dims=64, nope_dims=128,
            block_size=64, strided=False):  # fmt: skip
    """strided=True: the query is a view of a wider buffer."""

    def make(dtype, device, g):
        requests, width = len(seq_lens), kv_lora_rank + rope_dims
        if strided:
            query = wide_view(requests * heads, width, dtype, device, g).view(requests, heads, -1)
        else:
            query = randn((requests, heads, width), dtype, device, g)
        kv_cache, table = _latent_cache(seq_lens, block_size, width, dtype, device, g)
        out = randn((requests, heads, kv_lora_rank), dtype, device, g)
        lens_cpu = int_tensor(seq_lens, "cpu")
        return (out, query, kv_cache, table, lens_cpu.to(device), lens_cpu, max(seq_lens),
                kv_lora_rank, (nope_dims + rope_dims) ** -0.5)  # fmt: skip

    return make


def _gather(seq_starts, chunk_lens, kv_lora_rank=512, rope_dims=64, block_size=64):
    """Rows seq_starts[r] .. + chunk_lens[r] of each request, whose cached sequence runs a few
    rows further."""

    def make(dtype, device, g):
        width = kv_lora_rank + rope_dims
        seq_lens = [s + n + 3 for s, n in zip(seq_starts, chunk_lens, strict=True)]
        kv_cache, table = _latent_cache(seq_lens, block_size, width, dtype, device, g)
        out = randn((sum(chunk_lens), width), dtype, device, g)
        token_to_seq = [r for r, n in enumerate(chunk_lens) for _ in range(n)]
        return (out, kv_cache, table, cumulative(chunk_lens, device),
                int_tensor(token_to_seq, device), int_tensor(seq_starts, device))  # fmt: skip

    return make


def _prefill(query_lens, key_lens, causal, heads=16, nope_dims=128, rope_dims=64, v_dims=128,
             with_lse=True, strided=False):  # fmt: skip
    """strided=True: keys and values as the model makes them, the value a view of the
    up-projection's [k_nope | v] output and the key [k_nope | k_pe] with k_pe shared by heads."""

    def make(dtype, device, g):
        tokens, keys = sum(query_lens), sum(key_lens)
        query = randn((tokens, heads, nope_dims + rope_dims), dtype, device, g)
        if strided:
            kv = randn((keys, heads, nope_dims + v_dims), dtype, device, g)
            k_pe = randn((keys, 1, rope_dims), dtype, device, g)
            key = torch.cat([kv[..., :nope_dims], k_pe.expand(-1, heads, -1)], dim=-1)
            value = kv[..., nope_dims:]
        else:
            key = randn((keys, heads, nope_dims + rope_dims), dtype, device, g)
            value = randn((keys, heads, v_dims), dtype, device, g)
        out = randn((tokens, heads, v_dims), dtype, device, g)
        lse = torch.zeros(heads, tokens, device=device) if with_lse else None
        qsl_cpu, ksl_cpu = cumulative(query_lens, "cpu"), cumulative(key_lens, "cpu")
        return (out, lse, query, key, value, qsl_cpu.to(device), qsl_cpu, ksl_cpu.to(device),
                ksl_cpu, max(query_lens), max(key_lens), (nope_dims + rope_dims) ** -0.5,
                causal)  # fmt: skip

    return make


def _merge(tokens, heads=16, head_dim=128, with_lse=True, empty_prefix=(), spread=3.0):
    """empty_prefix: tokens whose prefix saw no key (lse -inf, out 0, as the prefill writes
    them); spread: the lse's scale (large: one side dominates)."""

    def make(dtype, device, g):
        prefix_out = randn((tokens, heads, head_dim), dtype, device, g)
        suffix_out = randn((tokens, heads, head_dim), dtype, device, g)
        prefix_lse = randn((heads, tokens), torch.float32, device, g, scale=spread)
        suffix_lse = randn((heads, tokens), torch.float32, device, g, scale=spread)
        if empty_prefix:
            index = torch.tensor(empty_prefix, device=device)
            prefix_out[index] = 0
            prefix_lse[:, index] = float("-inf")
        out = randn((tokens, heads, head_dim), dtype, device, g)
        out_lse = torch.zeros(heads, tokens, device=device) if with_lse else None
        return out, out_lse, prefix_out, prefix_lse, suffix_out, suffix_lse

    return make


SMALL = {"kv_lora_rank": 64, "rope_dims": 32}

CASES = {
    "concat_and_cache_mla": [
        Case("1 token, 512+64", _write([77])),
        Case("block boundaries, 512+64", _write([63, 64, 127, 128, 32 * 64 - 1])),
        Case("padding slots, 512+64", _write([65, -1, 200, -1, -1, 201])),
        Case("only padding", _write([-1, -1, -1])),
        Case("strided (fused kv_a), 512+64", _write(None, tokens=19, strided=True)),
        Case(
            "latent 64+32, bs 16, padding",
            _write([15, 16, -1, 17, 95], block_size=16, num_blocks=6, **SMALL),
        ),
        Case("2048 tokens, 512+64", _write(None, tokens=2048, num_blocks=40), big=True),
    ],
    "mla_decode": [
        Case("1 request, 1 token, 512+64", _decode([1])),
        Case("ragged, block boundaries, 512+64", _decode([1, 63, 64, 65, 128, 129, 300])),
        Case("bs 16, 128 heads, 512+64", _decode([5, 16, 17, 33], heads=128, block_size=16)),
        Case("strided query, 512+64", _decode([7, 70], strided=True)),
        Case(
            "latent 64+32, bs 16, ragged",
            _decode([1, 15, 16, 17, 40], heads=4, nope_dims=48, block_size=16, **SMALL),
        ),
        Case(
            "256 ragged requests, 512+64",
            _decode([1 + (i * 37) % 1024 for i in range(256)]),
            big=True,
        ),
    ],
    "mla_gather_cache": [
        Case("1 row, 512+64", _gather([0], [1])),
        Case("ragged, nonzero starts, 512+64", _gather([0, 5, 63, 64, 129], [1, 66, 2, 128, 3])),
        Case("latent 64+32, bs 16", _gather([0, 15, 16], [17, 1, 32], block_size=16, **SMALL)),
        Case("8 x 2048 rows, 512+64", _gather([512 * i for i in range(8)], [2048] * 8), big=True),
    ],
    "mla_prefill": [
        Case("1 token, causal", _prefill([1], [1], True)),
        Case("fresh prompts, ragged, causal", _prefill([5, 16, 17, 1], [5, 16, 17, 1], True)),
        Case("more keys than queries, causal", _prefill([4, 1, 9], [20, 33, 9], True)),
        Case("context chunk, not causal", _prefill([3, 1, 17], [64, 5, 30], False)),
        Case(
            "a request without context, no lse",
            _prefill([3, 2, 4], [10, 0, 7], False, with_lse=False),
        ),
        Case(
            "strided k/v (kv_b split), 4 heads",
            _prefill([6, 11], [6, 40], True, heads=4, strided=True),
        ),
        Case(
            "small heads 24+16 -> 20, causal",
            _prefill([7, 3], [7, 12], True, heads=3, nope_dims=24, rope_dims=16, v_dims=20),
        ),
        Case("2 x 1024 tokens, causal", _prefill([1024, 1024], [1024, 2048], True), big=True),
    ],
    "merge_attention_states": [
        Case("1 token, 1 head", _merge(1, heads=1)),
        Case("ragged lse, one side dominates", _merge(37, spread=40.0)),
        Case("prefix without keys (lse -inf)", _merge(9, empty_prefix=(0, 4, 8))),
        Case("no out_lse, latent 512", _merge(5, head_dim=512, with_lse=False)),
        Case("8192 tokens", _merge(8192), big=True),
    ],
}
