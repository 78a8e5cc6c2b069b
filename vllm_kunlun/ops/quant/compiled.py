"""Emulated-device fast paths: the W8A8 GEMM on torch._int_mm (int8 x int8 -> int32, on the
host) instead of the reference's chunked float32 GEMMs, and the int4 (wNa16) dequantization
from bytes instead of int32 shifts.

W8A8: the int8 weight is read as it is instead of being widened to float32 on every call, which
is where the reference spends its time at decode shapes. The accumulator is the same exact int32
sum, and the zero point and the float32 epilogue are the reference's functions, so the result
is bitwise the reference's. Tensors off the host, and a torch without _int_mm, run the
reference. Quantization runs the reference: it is elementwise and not where the time goes.

wNa16: at decode shapes the GEMM is cheap and unpacking the weight is the cost. In the layout's
nibble order (int4_layout.NIBBLE_ORDER = 4, 0, 5, 1, 6, 2, 7, 3) byte b of a little-endian word
holds channel b in its high nibble and channel b + 4 in its low one, so the word's eight values
in channel order are the high nibbles of its four bytes, then the low nibbles: two uint8
operations on a byte view, where the reference shifts and scatters int32s. The rest is the
reference's arithmetic on contiguous float32 tensors in place, (q - z) * s, rounded once, so the
result is bitwise the reference's. On this project's busy 2-core host (one thread, best of 21,
bf16, 1 group per 128 rows) wna16_gemm took 0.45 ms instead of 1.6 ms at [1, 576] x [576, 576]
and 3.5 ms instead of 13.9 ms at [8, 1536] x [1536, 1536] (a bf16 matmul of that size: 0.3 ms).
Tensors off the host, and a big-endian host, run the reference.
"""

import sys

import torch

from vllm_kunlun.ops.quant import reference
from vllm_kunlun.ops.quant.int4_layout import NIBBLE_ORDER

#: Byte b of a word holds channel b (high nibble) and b + 4 (low nibble): see above.
_HIGH_THEN_LOW = NIBBLE_ORDER[1::2] + NIBBLE_ORDER[0::2] == tuple(range(8))


def takes(x_q: torch.Tensor, w_q: torch.Tensor) -> bool:
    """Whether torch._int_mm runs this GEMM: int8 operands on the host."""
    return (
        hasattr(torch, "_int_mm")
        and x_q.device.type == "cpu"
        and w_q.device.type == "cpu"
        and x_q.dtype == torch.int8
        and w_q.dtype == torch.int8
    )


def int8_scaled_mm(
    x_q: torch.Tensor,
    x_absmax: torch.Tensor,
    w_q: torch.Tensor,
    w_absmax: torch.Tensor,
    x_zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    if not takes(x_q, w_q):
        return reference.int8_scaled_mm(x_q, x_absmax, w_q, w_absmax, x_zero_point, bias, out_dtype)
    acc = torch._int_mm(x_q, w_q.t())  # [R, N] int32; the transposed view is read as is
    acc = reference.subtract_zero_point(acc, w_q, x_zero_point)
    return reference.scale_accumulator(acc, x_absmax, w_absmax, bias, out_dtype)


def takes_int4(w_packed: torch.Tensor) -> bool:
    """Whether the byte-wise unpacking runs: packed weights on a little-endian host."""
    return _HIGH_THEN_LOW and sys.byteorder == "little" and w_packed.device.type == "cpu"


def _unpack_bytes(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., N / 8] -> uint8 [..., N], channels in natural order (see the docstring)."""
    octets = packed.contiguous().view(torch.uint8).unflatten(-1, (-1, 4))  # [..., N / 8, 4]
    return torch.cat([octets >> 4, octets & 0xF], dim=-1).flatten(-2)


def _dequantize(
    w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """reference.dequantize_int4, bitwise: the same float32 operations, in place."""
    group_size = reference.check_wna16_shapes(w_packed, scales, zeros)
    depth, channels = w_packed.shape[0], scales.shape[1]
    compute = torch.promote_types(scales.dtype, torch.float32)
    w = _unpack_bytes(w_packed).view(-1, group_size, channels).to(compute)
    w.sub_(_unpack_bytes(zeros).to(compute).unsqueeze(1))
    w.mul_(scales.to(compute).unsqueeze(1))
    return w.view(depth, channels).to(dtype)


def wna16_dequant(
    w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> torch.Tensor:
    if not takes_int4(w_packed):
        return reference.wna16_dequant(w_packed, scales, zeros)
    return _dequantize(w_packed, scales, zeros, scales.dtype)


def wna16_gemm(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    input_order: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    if not takes_int4(w_packed):
        return reference.wna16_gemm(x, w_packed, scales, zeros, input_order, bias)
    reference.check_wna16_shapes(w_packed, scales, zeros, x, input_order)
    w = _dequantize(w_packed, scales, zeros, x.dtype)
    return reference.dequantized_matmul(x, w, input_order, bias)
