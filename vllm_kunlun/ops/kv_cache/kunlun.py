"""Kunlun binding of the KV-cache family (KUNLUN.md §2d). Needs a Kunlun XPU; contract-tested.

- reshape_and_cache_flash with BLHD_LAYOUT=False is taken to mean the head-major
  [blocks, heads, block_size, dim] cache (§4.5); whether it skips negative (padding) slots is
  unknown, and so is whether it accepts int64 slot mappings (vLLM's dtype is passed, as the
  recorded plugin does).
- Kernels index pages from the cache's base pointer and ignore strides (C1, inferred), so the
  plugin's interleaved K/V pages go through the "hybrid cache" trick (§3.3, `PagedKV`).
"""

from dataclasses import dataclass

import torch

from vllm_kunlun.ops.kunlun_library import check_keywords, dense, library

KEYWORDS = {"reshape_and_cache_flash": ("BLHD_LAYOUT",)}


def prepare() -> None:
    check_keywords(KEYWORDS)


@dataclass(frozen=True)
class PagedKV:
    """The K and V caches as kernels must see them, and how block ids and slots map into them.

    The plugin's KV cache is one contiguous [num_blocks, Hkv, bs, 2 * D] tensor per layer whose
    blocks are [K page, V page]; the ops get the two non-contiguous page views. A kernel that
    indexes pages from the base pointer sees that buffer as 2 * num_blocks contiguous pages, so:
    k = all pages, v = all pages from page 1 on, block b -> page 2b, slot s -> s + (s // bs) * bs.
    """

    k: torch.Tensor
    v: torch.Tensor
    block_factor: int

    @classmethod
    def of(cls, key_cache: torch.Tensor, value_cache: torch.Tensor) -> "PagedKV":
        if key_cache.is_contiguous() and value_cache.is_contiguous():
            return cls(key_cache, value_cache, 1)
        pages = interleaved_pages(key_cache, value_cache)
        return cls(pages, pages[1:], 2)

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    def block_table(self, block_table: torch.Tensor) -> torch.Tensor:
        return dense((block_table * self.block_factor).to(torch.int32))

    def slot_mapping(self, slot_mapping: torch.Tensor) -> torch.Tensor:
        if self.block_factor == 1:
            return dense(slot_mapping)
        shifted = slot_mapping + (slot_mapping // self.block_size) * self.block_size
        return torch.where(slot_mapping >= 0, shifted, slot_mapping)  # keep padding slots


def interleaved_pages(key_cache: torch.Tensor, value_cache: torch.Tensor) -> torch.Tensor:
    """[2 * num_blocks, Hkv, bs, D] over the buffer whose K and V page views were passed."""
    num_blocks, kv_heads, block_size, head_size = key_cache.shape
    page = kv_heads * block_size * head_size
    page_strides = (2 * page, block_size * head_size, head_size, 1)
    offset = value_cache.data_ptr() - key_cache.data_ptr()
    storage_end = key_cache.storage_offset() + 2 * num_blocks * page
    if not (
        value_cache.shape == key_cache.shape
        and value_cache.dtype == key_cache.dtype
        and value_cache.device == key_cache.device
        and key_cache.stride() == value_cache.stride() == page_strides
        and offset == page * key_cache.element_size()
        and storage_end * key_cache.element_size() <= key_cache.untyped_storage().nbytes()
    ):
        raise ValueError(
            "The Kunlun kernels need contiguous K and V caches, or the K and V page views of one "
            "contiguous [num_blocks, Hkv, block_size, 2 * D] buffer (vllm_kunlun.attention."
            f"backend.split_kv_cache); got K {tuple(key_cache.shape)} strides "
            f"{key_cache.stride()} and V strides {value_cache.stride()} at byte offset {offset}."
        )
    return key_cache.as_strided(
        (2 * num_blocks, kv_heads, block_size, head_size),
        (page, block_size * head_size, head_size, 1),
    )


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    kv = PagedKV.of(key_cache, value_cache)
    library().reshape_and_cache_flash(
        dense(key.to(kv.k.dtype)), dense(value.to(kv.v.dtype)), kv.k, kv.v,
        kv.slot_mapping(slot_mapping), BLHD_LAYOUT=False,
    )  # fmt: skip
