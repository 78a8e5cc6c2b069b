"""The int4 weight layout of the weight-only (wNa16) ops: how 4-bit values sit in int32 words.

Eight unsigned 4-bit values share one int32 word, packed along the output channels N: word
[k, c] holds q[k, 8c + NIBBLE_ORDER[i]] in its bits 4i .. 4i+3. NIBBLE_ORDER is the order of
Kunlun's `awq_gemm` / `awq_dequantize` in their "normal" alignment (KUNLUN.md §2g: the recorded
plugin permutes the unpacked nibbles with [4, 0, 5, 1, 6, 2, 7, 3] within each int32), so the
Kunlun binding passes the packed tensors through unchanged. Zero points are packed the same way.

Checkpoint formats (GPTQ, AWQ, compressed-tensors) are converted to this layout once, at load
(vllm_kunlun.quantization), with `pack_int4`. Plain torch, any device.
"""

import torch

#: Slot i of a word holds channel 8c + NIBBLE_ORDER[i] (Kunlun's "normal" alignment).
NIBBLE_ORDER = (4, 0, 5, 1, 6, 2, 7, 3)
PACK = 8  # 4-bit values per int32 word
_SHIFTS = tuple(4 * i for i in range(PACK))


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., N / 8] -> the unsigned values int32 [..., N], channels in natural order.
    Views and elementwise ops only (no index tensor is copied to the device)."""
    shifts = torch.arange(0, 4 * PACK, 4, dtype=torch.int32, device=packed.device)
    slots = (packed.unsqueeze(-1) >> shifts) & 0xF  # [..., N/8, 8]: slot i of every word
    # NIBBLE_ORDER: slot 2j holds channel 4 + j, slot 2j + 1 holds channel j.
    pairs = slots.unflatten(-1, (PACK // 2, 2)).flip(-1)  # [..., j, (channel j, channel 4 + j)]
    return pairs.transpose(-1, -2).flatten(-3)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit values (any integer dtype) [..., N], N a multiple of 8 -> int32
    [..., N / 8] in this layout."""
    if values.shape[-1] % PACK:
        raise ValueError(f"cannot pack {values.shape[-1]} channels: not a multiple of {PACK}")
    # The range check reads values; a model built on the meta device (vllm-kunlun plan) has none.
    if values.numel() and not values.is_meta and (int(values.min()) < 0 or int(values.max()) > 15):
        raise ValueError("int4 values must lie in [0, 15]")
    words = values.to(torch.int64).unflatten(-1, (-1, PACK))  # [..., N/8, 8], natural order
    slots = words[..., list(NIBBLE_ORDER)]
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=values.device)
    packed = (slots << shifts).sum(dim=-1)  # < 2^32: fits int64, then wraps into int32
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
