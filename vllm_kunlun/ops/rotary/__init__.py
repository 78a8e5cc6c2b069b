"""Rotary family: rotary position embedding of queries and keys, in place."""

import torch

from vllm_kunlun.ops.declare import kernel_op


@kernel_op(mutates_args=("query", "key"))
def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    """Rotate the first rotary_dim features of every head of query and key by their position.

    positions: [T]; query: [T, H * head_size] or [T, H, head_size]; key likewise or None;
    cos_sin_cache: [max_position, rotary_dim] = [cos | sin]. NeoX pairs feature i with
    i + rotary_dim / 2, GPT-J pairs neighbours. Features past rotary_dim pass through.
    """
