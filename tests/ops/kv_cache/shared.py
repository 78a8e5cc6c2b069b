"""The plugin's KV-cache layout, as the kv_cache and attention tests build it.

Each layer's cache is one contiguous [num_blocks, Hkv, block_size, 2 * D] buffer whose blocks are
[K page, V page]; the attention backend hands the ops the two page views
(vllm_kunlun.attention.backend.split_kv_cache, which imports vLLM, so the kernel tests repeat its
one line here; tests/test_kunlun_provider_engine.py checks that the two agree).
"""

import torch


def kv_page_views(buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[num_blocks, Hkv, block_size, 2 * D] -> the K and V caches, each [num_blocks, Hkv, bs, D]."""
    num_blocks, kv_heads, block_size, two_d = buffer.shape
    pages = buffer.view(num_blocks, 2, kv_heads, block_size, two_d // 2)
    return pages[:, 0], pages[:, 1]


def plugin_kv_cache(
    num_blocks: int, kv_heads: int, block_size: int, head_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random per-layer cache buffer and the K/V page views the attention backend passes."""
    buffer = torch.randn(num_blocks, kv_heads, block_size, 2 * head_size).to(dtype)
    return buffer, *kv_page_views(buffer)
