"""Kunlun binding of the quantization family, W8A8 int8 and weight-only int4 (wNa16)
(KUNLUN.md §2g). Needs a Kunlun XPU; contract-tested only, against the stand-in library. Only
`kunlun_ops` functions are bound: the `xspeedgate_ops` quantization ops the recorded plugin also
calls (`static_scaled_int8_quant`, `dynamic_scaled_int8_quant`, `cutlass_scaled_mm`,
`cutlass_scaled_mm_azp`, `gptq_gemm`) are another library and are not used; what only they cover
runs the reference's PyTorch ops on the XPU.

- int8_quant_per_token: `quant2d(x=, y=, max=, force_sdnn=True)` (keywords, as recorded) on x
  viewed as contiguous rows [R, K] (C1), into a preallocated y int8 [R, K] and max float32
  [R, 1] (C2). `max` is the per-row absmax, not the scale (C4), which is what the op returns.
  force_sdnn=True as in every recorded activation use; what it selects is not recorded.
- int8_quant_static: no recorded kunlun_ops kernel (KUNLUN.md records only
  `xspeedgate_ops.static_scaled_int8_quant`), so it runs the reference's PyTorch ops on the XPU.
- int8_scaled_mm, symmetric (x_zero_point None): `matmul(x=x_q, w=w_q, out=, x_trans=False,
  w_trans=True, alpha=1.0, beta=0.0, bias=, x_pc_max=, w_pc_max=)` (keywords), the recorded
  symmetric W8A8 linear path: w_q int8 [N, K] as stored (w_trans=True), `out` [R, N]
  preallocated in out_dtype, bias cast to float32 as recorded (or None), x_pc_max the per-token
  absmax [R, 1] (recorded as [M, 1], x_s * 127 under static quantization: a per-tensor [1, 1]
  absmax is expanded to [R, 1], so the kernel always gets the recorded shape), w_pc_max the
  per-channel absmax [N]. Every tensor is made contiguous.
- int8_scaled_mm with a zero point (asymmetric static): no recorded kunlun_ops kernel
  (KUNLUN.md records only `xspeedgate_ops.cutlass_scaled_mm_azp`), so it runs the reference's
  PyTorch ops on the XPU.
- wna16_gemm, fewer than 256 rows (GEMM_MAX_ROWS) in fp16: `awq_gemm(x=, w=qweight, scale=,
  zeros=qzeros, out=, align_type=, group_size=)` (keywords, as recorded), x viewed as contiguous
  rows [R, K], `out` fp16 [R, N] preallocated (the only recorded out dtype), group_size = K / G.
  The packed layout (int4_layout.py) is the recorded repack's "normal" alignment, so w_packed
  and zeros are passed unchanged with align_type=0 (AWQ_NORMAL); the "fast" alignment (1, a
  64-nibble interleave) is never used.
- wna16_gemm otherwise (256 rows or more, as recorded, or x in bf16 / fp32, which awq_gemm's fp16
  out cannot hold): `awq_dequantize(qweight=, scales=, zeros=, weight=, group_m=, quant_type=0,
  align_type=0)` into a preallocated fp16 weight [K, N] (group_m = K / G), cast to x's dtype,
  then a torch matmul, the recorded large-batch path.
- wna16_gemm's input_order (GPTQ act-order): no recorded kunlun_ops kernel takes it, so x is
  permuted with torch's index_select on the XPU before either kernel. The bias is added by
  PyTorch afterwards, in x's dtype (neither kernel takes one).
- wna16_dequant: `awq_dequantize` as above, its fp16 weight cast to scales' dtype.
- w8a16_gemm (weight-only int8): no recorded kunlun_ops kernel multiplies 8-bit weights with
  float activations (`awq_gemm` / `awq_dequantize` are 4-bit), so it runs the reference's
  PyTorch ops on the XPU: the dequantization in float32 and a torch matmul.
- Zero rows call no kernel (empty results).

Assumptions (KUNLUN.md §4 records none of these):
- quant2d rounds half to even and clamps to [-127, 127] like the reference, computing
  x / (max / 127) in float32 closely enough that q differs at most by one at near-ties
  (check-kernels' random quantization cases allow that; its "half-way ties" cases do not, so
  they report a kernel that rounds ties differently), and writes max = 0, y = 0 for a row of
  zeros.
- matmul accumulates the int8 products exactly (int32), scales by x_pc_max / 127 and
  w_pc_max / 127, adds the float32 bias, and rounds once to out's dtype (the reference's
  epilogue, up to the order of the float32 multiplications); that it accepts out in float32
  as well as in the activation dtypes is assumed.
- The zero-point GEMM, the reference's on the XPU, assumes that xpytorch's float32 matmul
  multiplies int8-valued operands exactly and adds in float32 (not in a reduced precision):
  the reference's exact accumulation rests on it.
- awq_gemm and awq_dequantize with align_type=0 read the layout int4_layout.py describes: slot i
  of word [k, c] holds channel 8c + [4, 0, 5, 1, 6, 2, 7, 3][i]. KUNLUN.md says the recorded
  repack "permutes the unpacked nibbles with [4, 0, 5, 1, 6, 2, 7, 3]"; that is read as slot i
  taking channel perm[i]. Read the other way round, channels would come out permuted within
  each 8, which check-kernels on an XPU shows at once.
- Both compute W = (q - z) * s with unsigned q and z, group g covering rows [g * K / G,
  (g + 1) * K / G), exactly (float32) before one rounding; awq_gemm accumulates in float32 and
  rounds once to its fp16 out. They accept scales in the checkpoint's dtype as given (fp16
  recorded; bf16 and fp32 assumed).
- x in bf16 or fp32 goes through awq_dequantize's fp16 weight (awq_gemm would need x cast to
  fp16 too, losing x's precision as well), so W is rounded to fp16 before x's dtype: for bf16 a
  double rounding (fp16 is finer; at most one bf16 ulp off at near-ties); for fp32 W keeps
  fp16's 11 significant bits (relative error up to 2^-11 per weight, check-kernels' fp32 wNa16
  cases allow rtol 1e-3). Every dtype needs |W| below fp16's 65504, and keeps full precision
  only above 6.1e-5 (fp16's subnormals). wna16_dequant with bf16 or fp32 scales is the same.
"""

import torch

from vllm_kunlun.ops.kunlun_library import check_keywords, dense, library
from vllm_kunlun.ops.quant import reference

KEYWORDS = {
    "quant2d": ("x", "y", "max", "force_sdnn"),
    "matmul": ("x", "w", "out", "x_trans", "w_trans", "alpha", "beta", "bias", "x_pc_max",
               "w_pc_max"),
    "awq_gemm": ("x", "w", "scale", "zeros", "out", "align_type", "group_size"),
    "awq_dequantize": ("qweight", "scales", "zeros", "weight", "group_m", "quant_type",
                       "align_type"),
}  # fmt: skip
#: awq_gemm below this many rows, awq_dequantize and a matmul from it (as recorded).
GEMM_MAX_ROWS = 256
#: align_type of the "normal" alignment, the layout of int4_layout.py ("fast" is 1).
AWQ_NORMAL = 0


def prepare() -> None:
    check_keywords(KEYWORDS)


def int8_quant_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = dense(x.reshape(-1, x.shape[-1]))
    count = rows.shape[0]
    q = torch.empty(rows.shape, dtype=torch.int8, device=rows.device)
    absmax = torch.empty(count, 1, dtype=torch.float32, device=rows.device)
    if count:
        library().quant2d(x=rows, y=q, max=absmax, force_sdnn=True)
    return q, absmax


int8_quant_static = reference.int8_quant_static  # no recorded kunlun_ops kernel


def int8_scaled_mm(
    x_q: torch.Tensor,
    x_absmax: torch.Tensor,
    w_q: torch.Tensor,
    w_absmax: torch.Tensor,
    x_zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    if x_zero_point is not None:  # no recorded kunlun_ops kernel: PyTorch on the XPU
        return reference.int8_scaled_mm(x_q, x_absmax, w_q, w_absmax, x_zero_point, bias, out_dtype)
    rows, channels = x_q.shape[0], w_q.shape[0]
    out = torch.empty(rows, channels, dtype=out_dtype, device=x_q.device)
    if rows == 0:
        return out
    library().matmul(
        x=dense(x_q),
        w=dense(w_q),
        out=out,
        x_trans=False,
        w_trans=True,
        alpha=1.0,
        beta=0.0,
        bias=None if bias is None else dense(bias.float()),
        x_pc_max=dense(x_absmax.float().expand(rows, 1)),
        w_pc_max=dense(w_absmax.float().reshape(-1)),
    )
    return out


def awq_weight_fp16(
    w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> torch.Tensor:
    """W fp16 [K, N] from awq_dequantize (its only recorded weight dtype)."""
    group_size = reference.check_wna16_shapes(w_packed, scales, zeros)
    shape = (w_packed.shape[0], scales.shape[1])
    weight = torch.empty(shape, dtype=torch.float16, device=w_packed.device)
    if weight.numel():
        library().awq_dequantize(
            qweight=dense(w_packed),
            scales=dense(scales),
            zeros=dense(zeros),
            weight=weight,
            group_m=group_size,
            quant_type=0,
            align_type=AWQ_NORMAL,
        )
    return weight


def wna16_dequant(
    w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> torch.Tensor:
    return awq_weight_fp16(w_packed, scales, zeros).to(scales.dtype)


def _awq_gemm(
    rows: torch.Tensor,
    w_packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """fp16 rows [R, K] @ W -> fp16 [R, N] with awq_gemm."""
    out = torch.empty(rows.shape[0], scales.shape[1], dtype=torch.float16, device=rows.device)
    library().awq_gemm(
        x=rows,
        w=dense(w_packed),
        scale=dense(scales),
        zeros=dense(zeros),
        out=out,
        align_type=AWQ_NORMAL,
        group_size=group_size,
    )
    return out


def wna16_gemm(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    input_order: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    group_size = reference.check_wna16_shapes(w_packed, scales, zeros, x, input_order)
    if input_order is not None:  # no recorded kernel takes it: PyTorch on the XPU
        x = x.index_select(-1, input_order)
    rows = dense(x.reshape(-1, x.shape[-1]))
    count, channels = rows.shape[0], scales.shape[1]
    if count == 0:
        out = rows.new_empty(0, channels)
    elif x.dtype == torch.float16 and count < GEMM_MAX_ROWS:
        out = _awq_gemm(rows, w_packed, scales, zeros, group_size)
    else:
        out = rows @ awq_weight_fp16(w_packed, scales, zeros).to(x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.view(*x.shape[:-1], channels)


w8a16_gemm = reference.w8a16_gemm  # no recorded kunlun_ops kernel
