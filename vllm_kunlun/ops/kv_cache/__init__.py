"""KV-cache family: writing new keys and values into the paged cache."""

import torch

from vllm_kunlun.ops.declare import kernel_op


@kernel_op(mutates_args=("key_cache", "value_cache"))
def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write each token's key and value into its slot of the paged cache.

    key, value: [T, Hkv, D]; key_cache, value_cache: [num_blocks, Hkv, block_size, D] (views of
    the plugin's interleaved K/V pages are fine); slot_mapping: [T], slot = block * block_size
    + offset; negative slots (padding) are skipped.
    """
