"""Emulated-device fast path for the W8A8 GEMM: torch._int_mm (int8 x int8 -> int32, on the
host) instead of the reference's chunked float32 GEMMs.

The int8 weight is read as it is instead of being widened to float32 on every call, which is
where the reference spends its time at decode shapes. The accumulator is the same exact int32
sum, and the zero point and the float32 epilogue are the reference's functions, so the result
is bitwise the reference's. Tensors off the host, and a torch without _int_mm, run the
reference. Quantization runs the reference: it is elementwise and not where the time goes.
"""

import torch

from vllm_kunlun.ops.quant import reference


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
