"""Emulated-device fast path for rotary embedding (csrc/rotary_embedding.cpp): reads positions
and the cos/sin cache directly, one pass per row. Tensors on a real device take the reference."""

import torch

from vllm_kunlun.ops.build import load_kernels, on_host
from vllm_kunlun.ops.rotary import reference


def prepare() -> None:
    load_kernels()


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    if not on_host(query):
        reference.rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)
        return
    positions = positions.flatten().to(torch.int64).contiguous()
    num_tokens = positions.shape[0]
    cache = cos_sin_cache.contiguous()
    if cache.dtype not in (torch.float32, query.dtype):
        cache = cache.float()
    for x in (query, key):
        if x is not None:
            load_kernels().rotary_embedding(
                x.view(num_tokens, -1, head_size), positions, cache, is_neox
            )
