"""Emulated-device fast path for the paged KV write (csrc/elementwise.cpp): direct row copies."""

import torch

from vllm_kunlun.ops.build import load_kernels, on_host
from vllm_kunlun.ops.kv_cache import reference


def prepare() -> None:
    load_kernels()


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if not on_host(key) or not (key.dtype == value.dtype == key_cache.dtype):
        reference.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
        return
    load_kernels().reshape_and_cache(
        key, value, key_cache, value_cache, slot_mapping.to(torch.int64).contiguous()
    )
