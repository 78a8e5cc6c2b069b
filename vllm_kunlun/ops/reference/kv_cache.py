import torch


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write each token's key and value into its slot of the paged cache.

    key, value: [T, Hkv, D]; key_cache, value_cache: [num_blocks, Hkv, block_size, D];
    slot_mapping: [T], slot = block * block_size + offset; negative slots (padding) are skipped.
    """
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    block_size = key_cache.shape[2]
    slots = slot_mapping.long()
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, :, offsets] = key.to(key_cache.dtype)
    value_cache[blocks, :, offsets] = value.to(value_cache.dtype)
