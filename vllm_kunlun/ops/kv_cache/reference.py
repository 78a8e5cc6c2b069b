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

    Skipping must not ask the host which slots are negative (a device-to-host sync per layer):
    a padding token instead repeats the write of the first real token, which changes nothing.
    With no real token at all, every token writes slot 0's current contents back to slot 0.
    """
    if slot_mapping.numel() == 0:
        return
    token, slots, any_real = padding_safe_slots(slot_mapping)
    block_size = key_cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    for new, cache in ((key, key_cache), (value, value_cache)):
        rows = new[token].to(cache.dtype)
        rows = torch.where(any_real, rows, cache[blocks, :, offsets])
        cache[blocks, :, offsets] = rows


def padding_safe_slots(
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which token each write takes its row from, the slot it goes to, and whether any is real.

    A padding token (negative slot) repeats the write of the first real token; with no real
    token at all, the caller writes the slot's current contents back (`any_real` is False).
    """
    real = slot_mapping >= 0
    donor = torch.argmax(real.to(torch.uint8))  # the first real token, 0 if there is none
    token = torch.where(real, torch.arange(real.shape[0], device=real.device), donor)
    slots = slot_mapping[token].clamp(min=0).long()
    return token, slots, real.any()
