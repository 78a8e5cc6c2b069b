"""check-kernels cases of the attention family: ragged lengths, lengths at block boundaries,
GQA/MQA, sliding windows, soft-capping, prefills after cached context (chunked prefill, prefix
hits) mixed with one-token queries, strided queries, and the decode batch of 1024 requests that
KUNLUN.md §3.4 records the Kunlun kernel rejecting."""

import torch

from vllm_kunlun.ops.check.case import (
    Case,
    block_table,
    cumulative,
    int_tensor,
    paged_kv,
    randn,
    wide_view,
)

NUM_BLOCKS_SPARE = 4
MAX_MODEL_LEN = 4096


def _query(tokens: int, heads: int, head_size: int, dtype, device, g, strided: bool):
    if strided:
        return wide_view(tokens, heads * head_size, dtype, device, g).view(tokens, heads, -1)
    return randn((tokens, heads, head_size), dtype, device, g)


def _cache(seq_lens, block_size, kv_heads, head_size, dtype, device, g):
    blocks = sum(-(-n // block_size) for n in seq_lens) + NUM_BLOCKS_SPARE
    key_cache, value_cache = paged_kv(blocks, kv_heads, block_size, head_size, dtype, device, g)
    return key_cache, value_cache, block_table(seq_lens, block_size, blocks, device, g)


def _decode(seq_lens, heads=8, kv_heads=2, head_size=64, block_size=16, window=-1,
            softcap=0.0, strided=False):  # fmt: skip
    """strided=True: the query and the output are non-contiguous views."""

    def make(dtype, device, g):
        query = _query(len(seq_lens), heads, head_size, dtype, device, g, strided)
        key_cache, value_cache, table = _cache(seq_lens, block_size, kv_heads, head_size,
                                               dtype, device, g)  # fmt: skip
        out = _query(len(seq_lens), heads, head_size, dtype, device, g, strided)
        lens_cpu = int_tensor(seq_lens, "cpu")
        return (out, query, key_cache, value_cache, table, lens_cpu.to(device), lens_cpu,
                max(seq_lens), MAX_MODEL_LEN, head_size**-0.5, window, softcap)  # fmt: skip

    return make


def _prefill(query_lens, seq_lens, heads=8, kv_heads=2, head_size=64, block_size=16,
             window=-1, softcap=0.0, strided=False):  # fmt: skip
    """strided=True: the query and the output are non-contiguous views."""

    def make(dtype, device, g):
        query = _query(sum(query_lens), heads, head_size, dtype, device, g, strided)
        key_cache, value_cache, table = _cache(seq_lens, block_size, kv_heads, head_size,
                                               dtype, device, g)  # fmt: skip
        out = _query(sum(query_lens), heads, head_size, dtype, device, g, strided)
        qsl_cpu, ssl_cpu = cumulative(query_lens, "cpu"), cumulative(seq_lens, "cpu")
        return (out, query, key_cache, value_cache, table, qsl_cpu.to(device), qsl_cpu,
                int_tensor(seq_lens, device), ssl_cpu.to(device), ssl_cpu, max(query_lens),
                max(seq_lens), head_size**-0.5, window, softcap)  # fmt: skip

    return make


def _encoder(lengths, heads=4, kv_heads=4, head_size=64):
    def make(dtype, device, g):
        tokens = sum(lengths)
        query = randn((tokens, heads, head_size), dtype, device, g)
        key = randn((tokens, kv_heads, head_size), dtype, device, g)
        value = randn((tokens, kv_heads, head_size), dtype, device, g)
        qsl_cpu = cumulative(lengths, "cpu")
        return (torch.zeros_like(query), query, key, value, qsl_cpu.to(device), qsl_cpu,
                max(lengths), head_size**-0.5)  # fmt: skip

    return make


CASES = {
    "decode_attention": [
        Case("1 request, 1 token", _decode([1])),
        Case("ragged, block boundaries", _decode([1, 15, 16, 17, 32, 33, 100])),
        Case("MQA, head size 128", _decode([5, 64, 70], heads=4, kv_heads=1, head_size=128)),
        Case("sliding window 24", _decode([10, 24, 25, 90], window=24)),
        Case("soft-cap 30", _decode([7, 40, 41], softcap=30.0)),
        Case(
            "strided query and out, bs 64", _decode([3, 64, 65, 130], block_size=64, strided=True)
        ),
        Case(
            "1024 requests (KUNLUN.md 3.4)",
            _decode([1 + i % 48 for i in range(1024)], heads=4, kv_heads=1),
            big=True,
        ),
    ],
    "prefill_attention": [
        Case("1 request, 1 token", _prefill([1], [1])),
        Case("fresh prompts, ragged", _prefill([5, 16, 17, 1], [5, 16, 17, 1])),
        Case("after cached context", _prefill([4, 9, 1], [20, 9, 33])),
        Case("sliding window 8, context", _prefill([6, 12], [30, 12], window=8)),
        Case("soft-cap 20", _prefill([7, 3], [7, 10], softcap=20.0)),
        Case(
            "MQA, head size 80, strided q/out",
            _prefill([5, 11], [5, 40], heads=4, kv_heads=1, head_size=80, strided=True),
        ),
        Case(
            "2 x 1024 tokens",
            _prefill([1024, 1024], [1024, 2048], heads=8, kv_heads=2, head_size=128, block_size=64),
            big=True,
        ),
    ],
    "encoder_attention": [
        Case("1 token", _encoder([1])),
        Case("ragged", _encoder([3, 1, 17, 8])),
        Case("GQA 8:2", _encoder([9, 4], heads=8, kv_heads=2)),
        Case("4 x 512 tokens", _encoder([512] * 4), big=True),
    ],
}
