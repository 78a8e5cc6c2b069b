"""What the attention family's tests share: the plain formula (float64, loops), a paged KV cache
built by hand, the scenarios both the reference and the compiled kernels are tested on, and the
calls with every argument of the ops' full signatures.

Attention reads a paged KV cache whose blocks are scattered over a larger pool full of garbage,
so any mistake in paging, masking or head grouping shows up as a large error.
"""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from vllm_kunlun.ops.attention import reference

BLOCK_SIZES = [16, 32, 64, 128]
HEAD_LAYOUTS = [(4, 4), (9, 3), (8, 1)]  # (query heads, kv heads): MHA, GQA 3:1, MQA
HEAD_SIZE_FOR_BLOCK = {16: 80, 32: 64, 64: 128, 128: 64}
#: What the tests pass as max_model_len (sizes vendor kernels; the reference ignores it).
MAX_MODEL_LEN = 4096

ATTENTION_CASES = [
    pytest.param(block_size, heads, kv_heads, id=f"bs{block_size}-h{heads}kv{kv_heads}")
    for block_size in BLOCK_SIZES
    for heads, kv_heads in HEAD_LAYOUTS
]
WINDOW_SOFTCAP = [(1, 0.0), (7, 0.0), (50, 0.0), (-1, 5.0), (7, 5.0), (1000, 30.0)]

# A batch in the order vLLM builds it: (cached context, new tokens) per request.
PREFILL_BATCH = [
    (0, 17),  # fresh prompt
    (40, 33),  # chunked prefill: earlier chunk cached, next chunk new
    (150, 3),  # prefix-cache hit: long cached prefix, short new suffix
    (70, 1),  # one new token (decode-like) in the prefill batch
    (0, 1),  # one-token prompt
    (5, 20),  # short context, longer chunk
]


# The plain formula ---------------------------------------------------------------------------


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


def lod(lengths: list[int]) -> torch.Tensor:
    """[0, l0, l0 + l1, ...] int32 (Kunlun's "lod", vLLM's query_start_loc / seq_start_loc)."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()]).to(torch.int32)


# Decode --------------------------------------------------------------------------------------


def decode_seq_lens(block_size: int) -> list[int]:
    """Odd lengths, a single token, and lengths at and just past block boundaries."""
    return [1, 17, 33, block_size, block_size + 1, 2 * block_size + 3]


def decode_problem(
    dtype: torch.dtype, block_size: int, heads: int, kv_heads: int
) -> tuple[PagedKV, torch.Tensor, list[int], float]:
    """One decode token per request over decode_seq_lens: (paged, query, seq_lens, scale)."""
    head_size = HEAD_SIZE_FOR_BLOCK[block_size]
    seq_lens = decode_seq_lens(block_size)
    paged = build_paged_kv(seq_lens, kv_heads, head_size, block_size, dtype)
    query = torch.randn(len(seq_lens), heads, head_size).to(dtype)
    return paged, query, seq_lens, head_size**-0.5


def window_softcap_decode_problem(
    dtype: torch.dtype, head_size: int
) -> tuple[PagedKV, torch.Tensor, list[int], float]:
    """Short and long requests with large logits (so windows and soft-caps matter)."""
    block_size, heads, kv_heads = 16, 9, 3
    seq_lens = [1, 7, 8, 33, 61]
    paged = build_paged_kv(seq_lens, kv_heads, head_size, block_size, dtype)
    query = (torch.randn(len(seq_lens), heads, head_size) * 4).to(dtype)  # large logits
    return paged, query, seq_lens, head_size**-0.5


def run_decode(
    paged: PagedKV,
    query: torch.Tensor,
    seq_lens: list[int],
    scale: float,
    sliding_window: int,
    softcap: float,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
    kernel: Callable | None = None,
) -> torch.Tensor:
    """decode_attention with every argument; `kernel` defaults to the reference's."""
    kernel = reference.decode_attention if kernel is None else kernel
    out = torch.full_like(query, float("nan")) if out is None else out
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    kernel(
        out, query, paged.key_cache, paged.value_cache, paged.block_table, lens, lens.clone(),
        max_seq_len or max(seq_lens), MAX_MODEL_LEN, scale, sliding_window, softcap,
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


# Prefill -------------------------------------------------------------------------------------


def run_prefill(
    paged: PagedKV,
    query: torch.Tensor,
    batch: list[tuple[int, int]],
    scale: float,
    sliding_window: int,
    softcap: float,
    out: torch.Tensor | None = None,
    kernel: Callable | None = None,
) -> torch.Tensor:
    """prefill_attention with every argument; `kernel` defaults to the reference's."""
    kernel = reference.prefill_attention if kernel is None else kernel
    query_lens = [new for _, new in batch]
    seq_lens = [context + new for context, new in batch]
    query_start_loc, seq_start_loc = lod(query_lens), lod(seq_lens)
    if out is None:
        out = torch.full(query.shape, float("nan"), dtype=query.dtype)
    kernel(
        out, query, paged.key_cache, paged.value_cache, paged.block_table,
        query_start_loc, query_start_loc.clone(), torch.tensor(seq_lens, dtype=torch.int32),
        seq_start_loc, seq_start_loc.clone(), max(query_lens), max(seq_lens),
        scale, sliding_window, softcap,
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


# The ops' full argument lists (tests/ops/test_declare.py) ------------------------------------


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
        seq_lens, seq_lens.clone(), inputs["max_seq_len"], MAX_MODEL_LEN, 0.125, window, softcap,
    )  # fmt: skip


def prefill_op_args(inputs: dict, out: torch.Tensor, window: int, softcap: float) -> tuple:
    paged: PagedKV = inputs["paged"]
    return (
        out, inputs["prefill_query"], paged.key_cache, paged.value_cache, paged.block_table,
        inputs["query_start_loc"], inputs["query_start_loc"].clone(), inputs["seq_lens"],
        inputs["seq_start_loc"], inputs["seq_start_loc"].clone(), inputs["max_query_len"],
        inputs["max_seq_len"], 0.125, window, softcap,
    )  # fmt: skip
