"""check-kernels cases of the rotary family: NeoX and GPT-J pairing, partial rotary, no key,
3-D heads, and the adjacent query/key views of a fused qkv projection."""

import torch

from vllm_kunlun.ops.check.case import Case, randn

MAX_POSITION = 4096


def _rope(tokens, heads, kv_heads, head_size, rotary_dim, is_neox, *, key=True,
          fused=False, three_d=False):  # fmt: skip
    def make(dtype, device, g):
        positions = torch.randint(0, MAX_POSITION, (tokens,), generator=g).to(device)
        angles = torch.rand(MAX_POSITION, rotary_dim // 2, generator=g) * 6.3
        cache = torch.cat([angles.cos(), angles.sin()], dim=-1).to(device=device, dtype=dtype)
        q_width, k_width = heads * head_size, kv_heads * head_size
        if fused:
            qkv = randn((tokens, q_width + 2 * k_width), dtype, device, g)
            query, k = qkv[:, :q_width], qkv[:, q_width : q_width + k_width]
        else:
            query = randn((tokens, q_width), dtype, device, g)
            k = randn((tokens, k_width), dtype, device, g)
        if three_d:
            query, k = query.view(tokens, heads, head_size), k.view(tokens, kv_heads, head_size)
        return positions, query, k if key else None, head_size, cache, is_neox

    return make


CASES = {
    "rotary_embedding": [
        Case("1 token, NeoX", _rope(1, 4, 2, 64, 64, True)),
        Case("GPT-J pairs", _rope(13, 4, 2, 64, 64, False)),
        Case("partial rotary (32 of 128)", _rope(7, 2, 1, 128, 32, True)),
        Case("no key", _rope(5, 4, 4, 64, 64, True, key=False)),
        Case("3-D [T, H, D]", _rope(6, 8, 2, 80, 80, True, three_d=True)),
        Case("fused qkv views", _rope(17, 8, 2, 64, 64, True, fused=True)),
        Case("fused qkv views, GPT-J", _rope(9, 6, 2, 128, 64, False, fused=True)),
        Case("2048 tokens", _rope(2048, 32, 8, 128, 128, True, fused=True), big=True),
    ],
}
