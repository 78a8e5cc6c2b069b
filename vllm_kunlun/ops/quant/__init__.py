"""Quantization family: W8A8 int8 (symmetric dynamic per-token and static per-tensor activation
quantization, and the int8 GEMM with per-token / per-tensor and per-channel scales), the
weight-only int4 GEMM (wNa16: GPTQ, AWQ and compressed-tensors pack-quantized checkpoints, all
converted at load to one packed layout, int4_layout.py) with its dequantization, and the
weight-only int8 GEMM (W8A16: GPTQ 8-bit and compressed-tensors 8-bit pack-quantized, converted
at load to unsigned bytes [K, N]).

Kunlun's convention throughout (KUNLUN.md C4): activations and weights carry their absmax, not
their scale; scale = absmax / 127. A checkpoint's scale s therefore reaches these ops as
s * 127. Weights keep vLLM's / the checkpoint's layout w_q int8 [N, K]. Quantization computes in
float32 and rounds half to even; the GEMM accumulates exactly and scales in float32.

Declarations only: the kernels are in reference.py (the specification, also the emulated
device's kernel), compiled.py (the emulated device's int8 GEMM) and kunlun.py (the Kunlun
binding).
"""

import math

import torch

from vllm_kunlun.ops.declare import kernel_op


def _rows(x: torch.Tensor) -> int:
    return math.prod(x.shape[:-1])


def _per_token_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = _rows(x)
    q = x.new_empty(rows, x.shape[-1], dtype=torch.int8)
    return q, x.new_empty(rows, 1, dtype=torch.float32)


def _static_fake(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return x.new_empty(_rows(x), x.shape[-1], dtype=torch.int8)


def _scaled_mm_fake(
    x_q: torch.Tensor,
    x_absmax: torch.Tensor,
    w_q: torch.Tensor,
    w_absmax: torch.Tensor,
    x_zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return x_q.new_empty(x_q.shape[0], w_q.shape[0], dtype=out_dtype)


@kernel_op(fake=_per_token_fake)
def int8_quant_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic per-token int8 quantisation (Kunlun quant2d semantics: returns the per-row
    absmax, not the scale). x [..., K] float (any float dtype, may be non-contiguous), viewed as
    rows [R, K]. absmax[r] = max_k |x[r, k]| in float32; scale = absmax / 127;
    q = round(x / scale) (round half to even, computed in float32), clamped to [-127, 127]; a row
    of zeros gives q = 0 and absmax 0. -> (q int8 [R, K] contiguous, absmax float32 [R, 1])."""


@kernel_op(fake=_static_fake)
def int8_quant_static(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None
) -> torch.Tensor:
    """Static per-tensor int8 quantisation: q = clamp(round(x / scale) + zero_point, -128, 127) in
    float32 (round half to even), x [..., K] viewed as rows [R, K]; scale float32 [1];
    zero_point int32 [1], or None for symmetric (then 0). -> q int8 [R, K] contiguous."""


@kernel_op(fake=_scaled_mm_fake)
def int8_scaled_mm(
    x_q: torch.Tensor,
    x_absmax: torch.Tensor,
    w_q: torch.Tensor,
    w_absmax: torch.Tensor,
    x_zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """W8A8 GEMM in Kunlun's absmax convention (kunlun_ops.matmul x_pc_max / w_pc_max):
    out[r, n] = sum_k (x_q[r, k] - zp) * w_q[n, k] * (x_absmax[r] / 127) * (w_absmax[n] / 127)
    + bias[n], accumulated exactly (int32 or float64-exact), scaled in float32, rounded once to
    out_dtype. x_q int8 [R, K]; x_absmax float32 [R, 1] per token, or [1, 1] per tensor (static:
    scale * 127); w_q int8 [N, K] (vLLM's / the checkpoint's layout); w_absmax float32 [N] (per
    output channel, checkpoint scale * 127); x_zero_point int32 [1] or None; bias [N] (any float
    dtype) or None. -> new contiguous [R, N] in out_dtype."""


def _wna16_gemm_fake(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    input_order: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], scales.shape[-1])


def _wna16_dequant_fake(
    w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> torch.Tensor:
    return scales.new_empty(w_packed.shape[0], scales.shape[-1])


@kernel_op(fake=_wna16_gemm_fake)
def wna16_gemm(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    input_order: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Weight-only int4 GEMM with group scales and zero points: out = x' @ W (+ bias), where
    W = wna16_dequant(w_packed, scales, zeros) [K, N] in x's dtype and x' = x, or
    x[..., input_order] when given (GPTQ's act-order: the load-time sort of the weight's rows
    that makes every group contiguous). x [..., K] float (may be non-contiguous); w_packed int32
    [K, N / 8] (int4_layout.py); scales [G, N] any float dtype; zeros int32 [G, N / 8], the
    unsigned zero points packed like the weight (8 for symmetric formats); group g covers rows
    [g * K / G, (g + 1) * K / G); K a multiple of G (refused otherwise); input_order int64 [K]
    or None; bias [N] or None. -> new contiguous [..., N] in x's dtype."""


@kernel_op(fake=_wna16_dequant_fake)
def wna16_dequant(
    w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> torch.Tensor:
    """Dequantize packed int4 weights (Kunlun awq_dequantize / dequant_int4 semantics):
    W[k, n] = (q[k, n] - z[g, n]) * s[g, n] with g = k // (K / G), computed in float32 and rounded
    once to scales' dtype. w_packed int32 [K, N / 8], scales [G, N], zeros int32 [G, N / 8]
    (int4_layout.py); K a multiple of G (refused otherwise). -> new contiguous [K, N]."""


def _w8a16_gemm_fake(
    x: torch.Tensor,
    w_q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    input_order: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], w_q.shape[-1])


@kernel_op(fake=_w8a16_gemm_fake)
def w8a16_gemm(
    x: torch.Tensor,
    w_q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    input_order: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Weight-only int8 GEMM with group scales and zero points: out = x' @ W (+ bias), where
    W[k, n] = (q[k, n] - z[g, n]) * s[g, n] with g = k // (K / G), computed in float32 and
    rounded to x's dtype, and x' = x, or x[..., input_order] when given (GPTQ act-order), as
    wna16_gemm. x [..., K] float (may be non-contiguous); w_q uint8 [K, N] (the unsigned 8-bit
    values, input dimension first); scales [G, N] any float dtype; zeros uint8 [G, N], the
    unsigned zero points (128 for symmetric formats); K a multiple of G (refused otherwise);
    input_order int64 [K] or None; bias [N] or None. Accumulated in float32, rounded once.
    -> new contiguous [..., N] in x's dtype."""
