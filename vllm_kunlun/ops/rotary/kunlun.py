"""Kunlun binding of the rotary family (KUNLUN.md §2c). Needs a Kunlun XPU; contract-tested only.

The kernel takes contiguous [T, H * D] query and key and a cos/sin cache cast to the query's
dtype, and rotates in place. How it treats key=None is not recorded: a scratch one-head key is
rotated instead.
"""

import torch

from vllm_kunlun.ops.kunlun_library import check_keywords, dense, library

KEYWORDS = {
    "rotary_embedding": ("positions", "query", "key", "head_size", "cos_sin_cache", "is_neox"),
}


def prepare() -> None:
    check_keywords(KEYWORDS)


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    num_tokens = positions.numel()
    q = dense(query).view(num_tokens, -1)
    k = query.new_zeros(num_tokens, head_size) if key is None else dense(key).view(num_tokens, -1)
    library().rotary_embedding(
        positions=dense(positions.flatten()), query=q, key=k, head_size=head_size,
        cos_sin_cache=dense(cos_sin_cache.to(query.dtype)), is_neox=is_neox,
    )  # fmt: skip
    if not query.is_contiguous():
        query.copy_(q.view(query.shape))
    if key is not None and not key.is_contiguous():
        key.copy_(k.view(key.shape))
