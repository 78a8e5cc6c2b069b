"""check-kernels cases of the KV-cache family: the plugin's interleaved K/V pages, slots at
block boundaries, padding slots (-1), strided keys from a fused qkv projection."""

import torch

from vllm_kunlun.ops.check.case import Case, paged_kv, randn

NUM_BLOCKS = 64


def _write(slots: list[int] | None, tokens: int = 0, kv_heads: int = 2, head_size: int = 64,
           block_size: int = 16, strided: bool = False, separate: bool = False):  # fmt: skip
    def make(dtype, device, g):
        nonlocal slots
        if slots is None:  # distinct random slots outside block 0
            drawn = torch.randperm((NUM_BLOCKS - 1) * block_size, generator=g)[:tokens]
            chosen = (drawn + block_size).tolist()
        else:
            chosen = slots
        count = len(chosen)
        width = kv_heads * head_size
        if strided:
            qkv = randn((count, 3 * width), dtype, device, g)
            key = qkv[:, width : 2 * width].view(count, kv_heads, head_size)
            value = qkv[:, 2 * width :].view(count, kv_heads, head_size)
        else:
            key = randn((count, kv_heads, head_size), dtype, device, g)
            value = randn((count, kv_heads, head_size), dtype, device, g)
        if separate:
            shape = (NUM_BLOCKS, kv_heads, block_size, head_size)
            key_cache, value_cache = randn(shape, dtype, device, g), randn(shape, dtype, device, g)
        else:
            key_cache, value_cache = paged_kv(NUM_BLOCKS, kv_heads, block_size, head_size,
                                              dtype, device, g)  # fmt: skip
        slot_mapping = torch.tensor(chosen, dtype=torch.int64, device=device)
        return key, value, key_cache, value_cache, slot_mapping

    return make


CASES = {
    "reshape_and_cache": [
        Case("1 token", _write([37])),
        Case("block boundaries", _write([15, 16, 31, 32, 1023])),
        Case("padding slots", _write([17, -1, 40, -1, -1, 41])),
        Case("only padding", _write([-1, -1])),
        Case("strided keys (fused qkv)", _write(None, tokens=19, strided=True)),
        Case("separate contiguous caches", _write(None, tokens=11, separate=True)),
        Case(
            "block size 64, 8 kv heads x 128",
            _write(None, tokens=40, kv_heads=8, head_size=128, block_size=64),
        ),
        Case("1000 tokens", _write(None, tokens=1000), big=True),
    ],
}
