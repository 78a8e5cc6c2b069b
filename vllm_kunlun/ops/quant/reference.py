"""Reference W8A8 int8 kernels: plain PyTorch on any device, no host syncs.

Quantization computes in float32 whatever x's dtype (check-kernels' float64 oracle gets the
same q as a kernel on the device): the per-row absmax, scale = absmax / 127, q = round(x / scale)
with torch.round (half to even), clamped. A scale of 0 (a row of zeros) divides by 1 instead,
so the row quantizes to 0 without a NaN.

int8_scaled_mm accumulates sum_k x_q[r, k] * w_q[n, k] exactly in int32, as an int8 GEMM does,
with float32 GEMMs that run on any device: a product of two int8 values is at most 2^14 in
magnitude, so a float32 dot product of at most EXACT_CHUNK = 1024 of them has every partial sum
an integer of magnitude <= 2^24, exact in whatever order the GEMM adds. K is cut into chunks of
1024; each chunk's float32 result is converted to int32 and added. The zero point comes out of
the sum as zp * sum_k w_q[n, k] (exact in int32), so the chunks only ever see int8 values. The
int32 accumulator holds |sum| < 2^31, i.e. any K below 131072. The epilogue
(`scale_accumulator`) is float32: acc * (x_absmax / 127) * (w_absmax / 127) + bias, rounded
once to out_dtype; compiled.py shares it.

Why chunked float32 and not a float64 GEMM (exact for any realistic K, one call): widening the
int8 weight is the cost at decode shapes, and float64 doubles it and runs a slower GEMM. On
this project's busy 2-core CPU host (best of 21 calls, one thread) the float64 GEMM took 16 ms
for [1, 2048] x [2048, 2048] and 56 ms for [8, 2048] x [6144, 2048], this chunked float32 op
2.0 ms and 11.4 ms, where bf16 F.linear of the same size takes 0.5 ms and 2.4 ms. The chunk's
weight slice is widened inside the loop, so the float32 copy is small. (On the host,
compiled.py's torch._int_mm, 0.16 ms and 2.8 ms, is faster still; it is not device-agnostic.)

The weight-only int4 ops (wNa16) unpack the int32 words with int4_layout.unpack_int4 and
dequantize group by group on a [G, K / G, N] view: W = (q - z) * s in float32 (the float64
oracle keeps float64: at least float32), rounded once. The GEMM rounds W to x's dtype, as a
dequantize-then-GEMM kernel does, and accumulates x' @ W (+ bias) in float32, rounded once to
x's dtype: a GEMM kernel's float32 accumulator, and one matmul in float32 rather than in fp16,
which the host runs some hundred times slower (82 s against 0.2 s at [512, 4096] x [4096,
4096]). Shapes are checked, never values (that would sync). The weight-only int8 GEMM (W8A16)
is the same with unsigned bytes instead of packed nibbles.
"""

import torch

from vllm_kunlun.ops.quant.int4_layout import PACK, unpack_int4

#: Largest K slice whose float32 dot products of int8 values are exact (1024 * 2^14 = 2^24).
EXACT_CHUNK = 1024
QMAX = 127


def _rows_float32(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as contiguous rows [R, K] in float32 (the oracle's float64 narrows exactly)."""
    return x.reshape(-1, x.shape[-1]).float().contiguous()


def int8_quant_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """absmax per row; q = clamp(round(x / (absmax / 127)), -127, 127)."""
    rows = _rows_float32(x)
    absmax = rows.abs().amax(dim=-1, keepdim=True)
    scale = absmax / QMAX
    divisor = torch.where(scale > 0, scale, 1.0)  # a zero row: 0 / 1 = 0, not 0 / 0
    q = torch.round(rows / divisor).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, absmax


def int8_quant_static(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None
) -> torch.Tensor:
    """q = clamp(round(x / scale) + zero_point, -128, 127)."""
    q = torch.round(_rows_float32(x) / scale.float())
    if zero_point is not None:
        q = q + zero_point.float()
    return q.clamp_(-128, 127).to(torch.int8)


def int8_accumulate(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """sum_k x_q[r, k] * w_q[n, k], exactly, as int32 [R, N] (see the module docstring)."""
    rows, depth = x_q.shape
    acc = torch.zeros(rows, w_q.shape[0], dtype=torch.int32, device=x_q.device)
    x = x_q.float()
    for start in range(0, depth, EXACT_CHUNK):
        stop = start + EXACT_CHUNK
        partial = x[:, start:stop] @ w_q[:, start:stop].float().t()  # exact integers
        acc += partial.to(torch.int32)
    return acc


def subtract_zero_point(
    acc: torch.Tensor, w_q: torch.Tensor, x_zero_point: torch.Tensor | None
) -> torch.Tensor:
    """sum_k (x_q - zp) * w = sum_k x_q * w - zp * sum_k w, in int32."""
    if x_zero_point is None:
        return acc
    weight_sums = w_q.sum(dim=-1, dtype=torch.int32)
    return acc - x_zero_point.to(torch.int32) * weight_sums


def scale_accumulator(
    acc: torch.Tensor,
    x_absmax: torch.Tensor,
    w_absmax: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """acc * (x_absmax / 127) * (w_absmax / 127) (+ bias) in float32, rounded once."""
    x_scale = x_absmax.float() / QMAX  # [R, 1] or [1, 1]
    w_scale = w_absmax.float().reshape(-1) / QMAX  # [N]
    out = acc.float() * x_scale * w_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype).contiguous()


def int8_scaled_mm(
    x_q: torch.Tensor,
    x_absmax: torch.Tensor,
    w_q: torch.Tensor,
    w_absmax: torch.Tensor,
    x_zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """out = (sum_k (x_q - zp) w_q) * x_absmax / 127 * w_absmax / 127 + bias."""
    acc = subtract_zero_point(int8_accumulate(x_q, w_q), w_q, x_zero_point)
    return scale_accumulator(acc, x_absmax, w_absmax, bias, out_dtype)


# Weight-only int4 (wNa16) ------------------------------------------------------------------------


def check_wna16_shapes(
    w_packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    x: torch.Tensor | None = None,
    input_order: torch.Tensor | None = None,
) -> int:
    """The group size K / G, after checking the operands' shapes against each other."""
    depth, words = w_packed.shape
    groups, channels = scales.shape
    if groups == 0 or depth % groups:
        raise ValueError(
            f"wNa16: K = {depth} (w_packed's rows) is not a multiple of the number of groups "
            f"G = {groups} (scales' rows), so there is no whole group size K / G"
        )
    if channels != PACK * words:
        raise ValueError(
            f"wNa16: scales have N = {channels} columns, but w_packed [K, N / 8] has {words} "
            f"words per row, i.e. N = {PACK * words}"
        )
    if tuple(zeros.shape) != (groups, words):
        raise ValueError(
            f"wNa16: zeros must be [G, N / 8] = [{groups}, {words}], got {zeros.shape}"
        )
    if x is not None and x.shape[-1] != depth:
        raise ValueError(f"wNa16: x has {x.shape[-1]} features, the weight K = {depth}")
    if input_order is not None and tuple(input_order.shape) != (depth,):
        raise ValueError(f"wNa16: input_order must be [K] = [{depth}], got {input_order.shape}")
    return depth // groups


def dequantize_int4(
    w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """W [K, N] = (q - z[g]) * s[g] for the rows of group g, in (at least) float32, then dtype."""
    group_size = check_wna16_shapes(w_packed, scales, zeros)
    return dequantize_groups(unpack_int4(w_packed), unpack_int4(zeros), scales, group_size, dtype)


def dequantize_groups(
    q: torch.Tensor, z: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """W [K, N] = (q - z[g]) * s[g] from the unsigned integer values q [K, N] and zero points
    z [G, N]: the difference exact in int32, times the scale in (at least) float32, rounded once
    to dtype."""
    depth, channels = q.shape
    compute = torch.promote_types(scales.dtype, torch.float32)
    differences = q.to(torch.int32).view(-1, group_size, channels) - z.to(torch.int32).unsqueeze(1)
    w = differences.to(compute) * scales.to(compute).unsqueeze(1)
    return w.view(depth, channels).to(dtype)


def wna16_dequant(
    w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> torch.Tensor:
    """W = (q - z) * s, rounded once to scales' dtype."""
    return dequantize_int4(w_packed, scales, zeros, scales.dtype)


def wna16_gemm(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    input_order: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """out = x' @ W (+ bias), W dequantized and rounded to x's dtype, x' = x[..., input_order]."""
    check_wna16_shapes(w_packed, scales, zeros, x, input_order)
    w = dequantize_int4(w_packed, scales, zeros, x.dtype)
    return dequantized_matmul(x, w, input_order, bias)


def dequantized_matmul(
    x: torch.Tensor, w: torch.Tensor, input_order: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """The weight-only GEMMs after the dequantization (w [K, N] in x's dtype): x' @ w (+ bias)
    accumulated in float32, rounded once to x's dtype, contiguous. compiled.py shares it."""
    accumulate = torch.promote_types(x.dtype, torch.float32)
    if input_order is not None:
        x = x.index_select(-1, input_order)
    out = x.to(accumulate) @ w.to(accumulate)
    if bias is not None:
        out = out + bias.to(x.dtype).to(accumulate)
    return out.to(x.dtype)


# Weight-only int8 (W8A16) -------------------------------------------------------------------------


def check_w8a16_shapes(
    w_q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    x: torch.Tensor | None = None,
    input_order: torch.Tensor | None = None,
) -> int:
    """The group size K / G, after checking the operands' shapes against each other."""
    for name, tensor in (("w_q", w_q), ("scales", scales), ("zeros", zeros)):
        if tensor.dim() != 2:
            raise ValueError(f"W8A16: {name} must be 2-D, got {list(tensor.shape)}")
    depth, channels = w_q.shape
    groups = scales.shape[0]
    if w_q.dtype != torch.uint8 or zeros.dtype != torch.uint8:
        raise ValueError(f"W8A16: w_q and zeros must be uint8, got {w_q.dtype} and {zeros.dtype}")
    if groups == 0 or depth % groups:
        raise ValueError(
            f"W8A16: K = {depth} (w_q's rows) is not a multiple of the number of groups "
            f"G = {groups} (scales' rows), so there is no whole group size K / G"
        )
    if tuple(scales.shape) != (groups, channels) or tuple(zeros.shape) != (groups, channels):
        raise ValueError(
            f"W8A16: scales and zeros must be [G, N] = [{groups}, {channels}], got "
            f"{list(scales.shape)} and {list(zeros.shape)}"
        )
    if x is not None and x.shape[-1] != depth:
        raise ValueError(f"W8A16: x has {x.shape[-1]} features, the weight K = {depth}")
    if input_order is not None and tuple(input_order.shape) != (depth,):
        raise ValueError(f"W8A16: input_order must be [K] = [{depth}], got {input_order.shape}")
    return depth // groups


def dequantize_int8(
    w_q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """W [K, N] = (q - z[g]) * s[g] for the rows of group g, in (at least) float32, then dtype."""
    group_size = check_w8a16_shapes(w_q, scales, zeros)
    return dequantize_groups(w_q, zeros, scales, group_size, dtype)


def w8a16_gemm(
    x: torch.Tensor,
    w_q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    input_order: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """out = x' @ W (+ bias), W dequantized and rounded to x's dtype, x' = x[..., input_order]."""
    check_w8a16_shapes(w_q, scales, zeros, x, input_order)
    w = dequantize_int8(w_q, scales, zeros, x.dtype)
    return dequantized_matmul(x, w, input_order, bias)
