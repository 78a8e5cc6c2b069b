"""Kunlun binding of the quantization family, W8A8 int8 (KUNLUN.md §2g). Needs a Kunlun XPU;
contract-tested only, against the stand-in library. Only `kunlun_ops` functions are bound: the
`xspeedgate_ops` quantization ops the recorded plugin also calls (`static_scaled_int8_quant`,
`dynamic_scaled_int8_quant`, `cutlass_scaled_mm`, `cutlass_scaled_mm_azp`) are another library
and are not used; what only they cover runs the reference's PyTorch ops on the XPU.

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
"""

import torch

from vllm_kunlun.ops.kunlun_library import check_keywords, dense, library
from vllm_kunlun.ops.quant import reference

KEYWORDS = {
    "quant2d": ("x", "y", "max", "force_sdnn"),
    "matmul": ("x", "w", "out", "x_trans", "w_trans", "alpha", "beta", "bias", "x_pc_max",
               "w_pc_max"),
}  # fmt: skip


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
