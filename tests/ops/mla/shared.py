"""What the MLA family's tests share: the model's side of Multi-head Latent Attention written out
in full (per-head up-projections of the latent rows into ordinary keys and values, plain softmax
attention per head, float64 and loops), a paged latent cache built by hand, and the calls with
every argument of the ops' full signatures.

The model's weights follow nn.Linear: W_UK [H, P, L] maps a latent row c [L] to head h's
no-rope key c @ W_UK[h].T [P]; W_UV [H, V, L] maps it to head h's value c @ W_UV[h].T [V]. Head
h's full key is [c @ W_UK[h].T | k_pe], its query [q_nope | q_pe]. Decode runs the "absorbed"
form: the query [q_nope @ W_UK[h] | q_pe] against the cache rows [c | k_pe], and a latent output
o that the model up-projects as o @ W_UV[h].T; none of that absorption is used to build an
expectation here, which always comes from the full keys and values.
"""

from dataclasses import dataclass

import pytest
import torch

from tests.ops.helpers import TOLERANCES

#: (kv_lora_rank L, rope dims R, no-rope query/key dims P, value dims V, heads H): small and odd
#: latent sizes, and DeepSeek-V2/V3's 512 + 64 with its 128-dim heads.
LATENT_SHAPES = [
    pytest.param(32, 16, 24, 20, 3, id="L32R16-H3"),
    pytest.param(64, 32, 48, 64, 4, id="L64R32-H4"),
    pytest.param(512, 64, 128, 128, 2, id="L512R64-H2"),
]
BLOCK_SIZES = [16, 64]


# The model's side, in full ---------------------------------------------------------------------


@dataclass
class Projections:
    """One layer's per-head up-projections of the latent rows (float64)."""

    w_uk: torch.Tensor  # [H, P, L]
    w_uv: torch.Tensor  # [H, V, L]

    @property
    def heads(self) -> int:
        return self.w_uk.shape[0]


def make_projections(heads: int, kv_lora_rank: int, nope_dims: int, v_dims: int) -> Projections:
    """Entries of 1/sqrt(L): keys and values of order 1 from latent rows of order 1."""
    w_uk = torch.randn(heads, nope_dims, kv_lora_rank, dtype=torch.float64) / kv_lora_rank**0.5
    w_uv = torch.randn(heads, v_dims, kv_lora_rank, dtype=torch.float64) / kv_lora_rank**0.5
    return Projections(w_uk, w_uv)


def full_keys_values(
    latent: torch.Tensor, k_pe: torch.Tensor, proj: Projections
) -> tuple[torch.Tensor, torch.Tensor]:
    """latent [S, L], k_pe [S, R] -> keys [S, H, P + R], values [S, H, V] (float64), head by
    head: k_h = [c @ W_UK[h].T | k_pe], v_h = c @ W_UV[h].T."""
    c, pe = latent.double(), k_pe.double()
    keys, values = [], []
    for h in range(proj.heads):
        keys.append(torch.cat([c @ proj.w_uk[h].T, pe], dim=-1))
        values.append(c @ proj.w_uv[h].T)
    return torch.stack(keys, dim=1), torch.stack(values, dim=1)


def plain_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: list[int], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """query [Q, H, D], keys [S, H, D], values [S, H, Dv]; query row i sees keys 0..visible[i]-1.

    Returns (out [Q, H, Dv], lse [H, Q]) in float64: softmax(q . k * scale) v per head, and the
    natural log of sum(exp(scores)); a row that sees no key gets 0 and -inf.
    """
    num_queries, heads = query.shape[:2]
    out = torch.zeros(num_queries, heads, values.shape[-1], dtype=torch.float64)
    lse = torch.full((heads, num_queries), float("-inf"), dtype=torch.float64)
    for row, count in enumerate(visible):
        if count == 0:
            continue
        for h in range(heads):
            k, v = keys[:count, h].double(), values[:count, h].double()
            scores = (k @ query[row, h].double()) * scale
            top = scores.max()
            weights = torch.exp(scores - top)
            out[row, h] = (weights / weights.sum()) @ v
            lse[h, row] = top + torch.log(weights.sum())
    return out, lse


def causal_visible(num_queries: int, num_keys: int) -> list[int]:
    """Bottom-right aligned causal mask: query i sees keys 0 .. i + num_keys - num_queries."""
    return [max(0, min(num_keys, i + num_keys - num_queries + 1)) for i in range(num_queries)]


def up_project(latent_out: torch.Tensor, proj: Projections) -> torch.Tensor:
    """Decode's latent output o [R, H, L] -> [R, H, V] (float64): o_h @ W_UV[h].T per head."""
    o = latent_out.double()
    return torch.stack([o[:, h] @ proj.w_uv[h].T for h in range(proj.heads)], dim=1)


def absorbed_query(q_nope: torch.Tensor, q_pe: torch.Tensor, proj: Projections) -> torch.Tensor:
    """[R, H, P] and [R, H, R'] -> decode's query [R, H, L + R'] (float64): q_nope @ W_UK[h]."""
    latent = torch.stack([q_nope[:, h].double() @ proj.w_uk[h] for h in range(proj.heads)], 1)
    return torch.cat([latent, q_pe.double()], dim=-1)


# A paged latent cache built by hand ------------------------------------------------------------


@dataclass
class LatentCache:
    kv_cache: torch.Tensor  # [num_blocks, block_size, L + R]
    block_table: torch.Tensor  # [requests, width] int32
    latent: list[torch.Tensor]  # per request, [seq_len, L]: what the cache holds, in its dtype
    k_pe: list[torch.Tensor]  # per request, [seq_len, R]


def build_latent_cache(
    seq_lens: list[int],
    kv_lora_rank: int,
    rope_dims: int,
    block_size: int,
    dtype: torch.dtype,
    garbage: float | None = None,
) -> LatentCache:
    """Each request's rows written by direct assignment into blocks scattered over a pool.

    Spare blocks, the tail of each last block and the block table's unused columns (which point
    at random blocks, as stale entries do) hold large random values, or `garbage` (e.g. NaN).
    """
    blocks_needed = [-(-length // block_size) for length in seq_lens]
    num_blocks = sum(blocks_needed) + 4
    width = kv_lora_rank + rope_dims
    kv_cache = (torch.randn(num_blocks, block_size, width) * 30).to(dtype)
    if garbage is not None:
        kv_cache.fill_(garbage)
    table_width = max(blocks_needed) + 2
    block_table = torch.randint(0, num_blocks, (len(seq_lens), table_width), dtype=torch.int32)
    pool = torch.randperm(num_blocks).tolist()  # non-monotonic placement
    latent, k_pe = [], []
    for request, length in enumerate(seq_lens):
        c = torch.randn(length, kv_lora_rank).to(dtype)
        pe = torch.randn(length, rope_dims).to(dtype)
        for index in range(blocks_needed[request]):
            block = pool.pop()
            block_table[request, index] = block
            start = index * block_size
            stop = min(start + block_size, length)
            kv_cache[block, : stop - start] = torch.cat([c[start:stop], pe[start:stop]], dim=-1)
        latent.append(c)
        k_pe.append(pe)
    return LatentCache(kv_cache, block_table, latent, k_pe)


def lod(lengths: list[int]) -> torch.Tensor:
    """[0, l0, l0 + l1, ...] int32 (query_start_loc, cu_seq_lens)."""
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + length)
    return torch.tensor(starts, dtype=torch.int32)


def assert_close_in(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """A float64 quantity derived from a kernel's `dtype` output, within that dtype's tolerance."""
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected.double(), **TOLERANCES[dtype])


# The ops' full argument lists ------------------------------------------------------------------


def decode_args(out, query, cache: LatentCache, seq_lens: list[int], kv_lora_rank: int,
                scale: float) -> tuple:  # fmt: skip
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return (out, query, cache.kv_cache, cache.block_table, lens, lens.clone(), max(seq_lens),
            kv_lora_rank, scale)  # fmt: skip


def prefill_args(out, lse, query, key, value, query_lens: list[int], key_lens: list[int],
                 scale: float, causal: bool) -> tuple:  # fmt: skip
    query_start_loc, key_start_loc = lod(query_lens), lod(key_lens)
    return (out, lse, query, key, value, query_start_loc, query_start_loc.clone(), key_start_loc,
            key_start_loc.clone(), max(query_lens), max(key_lens), scale, causal)  # fmt: skip


def mla_op_samples(dtype: torch.dtype = torch.float32) -> dict[str, tuple]:
    """One small valid argument tuple per mla op (fresh tensors on every call), for
    tests/ops/test_declare.py: latent 32 + 16, 3 heads, block size 16; lse float32."""
    kv_lora_rank, rope_dims, heads = 32, 16, 3
    width = kv_lora_rank + rope_dims
    cache = build_latent_cache([5, 17], kv_lora_rank, rope_dims, 16, dtype)
    tokens, query_lens, key_lens = 4, [3, 1], [3, 6]
    gathered = [2, 9]  # rows 0..1 of request 0 and 8..16 of request 1

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape).to(dtype)

    return {
        # two tokens, one padding token, into a 4-block cache
        "concat_and_cache_mla": (randn(3, kv_lora_rank), randn(3, rope_dims),
                                 torch.zeros(4, 16, width, dtype=dtype), torch.tensor([5, -1, 60])),
        "mla_decode": decode_args(torch.empty(2, heads, kv_lora_rank, dtype=dtype),
                                  randn(2, heads, width), cache, [5, 17], kv_lora_rank, 0.125),
        "mla_gather_cache": (torch.empty(sum(gathered), width, dtype=dtype), cache.kv_cache,
                             cache.block_table, lod(gathered),
                             torch.tensor([0] * 2 + [1] * 9, dtype=torch.int32),
                             torch.tensor([0, 8], dtype=torch.int32)),
        "mla_prefill": prefill_args(torch.empty(tokens, heads, 20, dtype=dtype),
                                    torch.empty(heads, tokens), randn(tokens, heads, 40),
                                    randn(9, heads, 40), randn(9, heads, 20), query_lens, key_lens,
                                    0.125, True),
        "merge_attention_states": (torch.empty(tokens, heads, 20, dtype=dtype),
                                   torch.empty(heads, tokens), randn(tokens, heads, 20),
                                   torch.randn(heads, tokens), randn(tokens, heads, 20),
                                   torch.randn(heads, tokens)),
    }  # fmt: skip
