"""check-kernels cases of the quantization family. W8A8 int8: one token, K odd and not a power
of two, N odd, a row of zeros, strided and 3-D input, saturation, negative and positive zero
points, bias and no bias, a per-tensor [1, 1] activation absmax, the exact accumulation over a
long K, and large batches. Weight-only int4 (wNa16): one token, N an odd multiple of 8, K not a
power of two, one group and many, zero points at 0 and 15, act-order input_order, bias and no
bias, strided and 3-D x, a strided packed weight, 256 rows and more (the Kunlun binding's
dequantize-then-matmul path), and a large GEMM. Weight-only int8 (W8A16): the same kinds of
shapes, random and symmetric (128) zero points.

The case's dtype is the activation dtype: x's for the quantization ops, the output's and the
bias's for the W8A8 GEMM (its int8 operands and float32 absmaxes do not change with it), x's,
the scales' and the bias's for the wNa16 GEMM, the scales' for the dequantization.

The wNa16 cases allow float32 a relative error of 1e-3: the Kunlun kernels write the weight in
fp16 only (KUNLUN.md §2g), so a float32 GEMM or dequantization on them carries fp16's 11
significant bits (up to 2^-11 relative per weight), where the reference rounds to float32.

Quantized values are integer outputs, compared on their own (check/runner.py). Random cases
allow a difference of one: a kernel that computes x / scale in another order (say
x * (127 / absmax)) may round a value within a few ulps of a half-way point the other way. The
"half-way ties" cases hit exact ties (x / scale = k + 0.5, exact in every dtype) and allow none:
they check the round-half-to-even the reference specifies (and the Kunlun binding assumes).
"""

import torch

from vllm_kunlun.ops.check.case import Case, int_tensor, randn, wide_view
from vllm_kunlun.ops.quant.int4_layout import pack_int4

#: Random quantization cases: a near-tie may round either way in another kernel.
NEAR_TIE = 1


def _x(shape: tuple[int, ...], dtype, device, g, strided: bool = False) -> torch.Tensor:
    if strided:
        return wide_view(shape[0], shape[1], dtype, device, g)
    return randn(shape, dtype, device, g, 2.0)


def _per_token(shape: tuple[int, ...], strided=False, zero_row: int | None = None):
    def make(dtype, device, g):
        x = _x(shape, dtype, device, g, strided)
        if zero_row is not None:
            x[zero_row] = 0.0
        return (x,)

    return make


def _ties(rows: int) -> torch.Tensor:
    """Rows whose absmax is 127 (scale exactly 1) holding every half-way point k + 0.5 for
    k in [-64, 63] (exact in bf16/fp16/fp32): x / scale is an exact tie."""
    halves = torch.arange(-64, 64, dtype=torch.float32) + 0.5
    row = torch.cat([torch.tensor([127.0, -127.0]), halves])
    return torch.stack([row.roll(shifts=3 * r) for r in range(rows)])


def _per_token_ties(dtype, device, g):
    return (_ties(3).to(device=device, dtype=dtype),)


def _static(shape: tuple[int, ...], scale: float, zero_point: int | None, strided=False):
    def make(dtype, device, g):
        x = _x(shape, dtype, device, g, strided)
        zp = None if zero_point is None else int_tensor([zero_point], device)
        return x, torch.tensor([scale], dtype=torch.float32, device=device), zp

    return make


def _static_ties(zero_point: int | None):
    def make(dtype, device, g):
        x = (_ties(4) * 0.25).to(device=device, dtype=dtype)  # scale 0.25: x / scale = k + 0.5
        zp = None if zero_point is None else int_tensor([zero_point], device)
        return x, torch.tensor([0.25], dtype=torch.float32, device=device), zp

    return make


def _int8(shape: tuple[int, ...], device, g, low: int = -127) -> torch.Tensor:
    return torch.randint(low, 128, shape, generator=g, dtype=torch.int8).to(device)


def _absmax(shape: tuple[int, ...], device, g) -> torch.Tensor:
    return (torch.rand(shape, generator=g) * 4 + 0.05).to(device)


def _scaled_mm(rows: int, depth: int, channels: int, bias=True, zero_point: int | None = None,
               per_tensor=False, strided=False, zero_row: int | None = None):  # fmt: skip
    def make(dtype, device, g):
        if strided:
            x_q = _int8((rows, depth + 16), device, g, low=-128)[:, 16:]
        else:
            x_q = _int8((rows, depth), device, g, low=-128 if zero_point is not None else -127)
        x_absmax = _absmax((1, 1) if per_tensor else (rows, 1), device, g)
        if zero_row is not None:
            x_q[zero_row] = 0
            x_absmax[zero_row] = 0.0
        w_q = _int8((channels, depth), device, g)
        w_absmax = _absmax((channels,), device, g)
        zp = None if zero_point is None else int_tensor([zero_point], device)
        b = randn((channels,), dtype, device, g) if bias else None
        return x_q, x_absmax, w_q, w_absmax, zp, b, dtype

    return make


def _long_exact_sum(dtype, device, g):
    """K = 8192 of +-127 and -128 with mostly one sign: sums far above 2^24, where a float32
    accumulation would round; absmaxes of 127 make the scales exactly 1."""
    rows, channels, depth = 3, 5, 8192
    signs = torch.where(torch.rand(rows + channels, depth, generator=g) < 0.9, 1, -1)
    values = (signs * 127).to(torch.int8)
    values[1, ::7] = -128
    x_q, w_q = values[:rows].to(device), values[rows:].to(device)
    ones = torch.full((rows, 1), 127.0, device=device)
    return x_q, ones, w_q, torch.full((channels,), 127.0, device=device), None, None, dtype


def _near(name: str, make, big: bool = False) -> Case:
    """A random quantization case: q may differ by one at a near-tie (module docstring)."""
    return Case(name, make, big=big, integer_tolerance=NEAR_TIE)


#: wNa16: fp16 weights on the Kunlun kernels (module docstring).
FP16_WEIGHTS = {torch.float32: (1e-5, 1e-3)}


def _int4_operands(depth: int, channels: int, groups: int, dtype, device, g,
                   zero_points: str = "random", strided: bool = False):  # fmt: skip
    """w_packed int32 [K, N / 8], scales [G, N] in dtype, zeros int32 [G, N / 8]. zero_points:
    "random" (0..15) or "extremes" (0 and 15, alternating); strided: column slices of a packed
    weight twice as wide, as a fused projection's."""
    width = 2 * channels if strided else channels
    q = torch.randint(0, 16, (depth, width), generator=g)
    if zero_points == "extremes":
        z = torch.where(torch.arange(groups * width).view(groups, width) % 2 == 0, 0, 15)
    else:
        z = torch.randint(0, 16, (groups, width), generator=g)
    scales = torch.rand(groups, width, generator=g) * 0.02 + 0.002
    w_packed, zeros = pack_int4(q).to(device), pack_int4(z).to(device)
    scales = scales.to(device=device, dtype=dtype)
    if strided:
        words = channels // 8
        return w_packed[:, words:], scales[:, channels:], zeros[:, words:]
    return w_packed, scales, zeros


def _wna16_gemm(shape: tuple[int, ...], channels: int, groups: int, bias: bool = True,
                ordered: bool = False, strided_x: bool = False, **operands):  # fmt: skip
    """x [*shape] (rows .. , K), N channels, G groups; operands: _int4_operands' options."""
    depth = shape[-1]

    def make(dtype, device, g):
        if strided_x:
            x = wide_view(shape[0], depth, dtype, device, g)
        else:
            x = randn(shape, dtype, device, g)
        w_packed, scales, zeros = _int4_operands(depth, channels, groups, dtype, device, g,
                                                 **operands)  # fmt: skip
        order = torch.randperm(depth, generator=g).to(device) if ordered else None
        b = randn((channels,), dtype, device, g) if bias else None
        return x, w_packed, scales, zeros, order, b

    return make


def _wna16_dequant(depth: int, channels: int, groups: int, **operands):
    def make(dtype, device, g):
        return _int4_operands(depth, channels, groups, dtype, device, g, **operands)

    return make


def _w8a16_gemm(shape: tuple[int, ...], channels: int, groups: int, bias: bool = True,
                ordered: bool = False, strided_x: bool = False,
                symmetric: bool = False):  # fmt: skip
    """x [*shape], N channels, G groups: uint8 weights, zero points 128 (symmetric) or random."""
    depth = shape[-1]

    def make(dtype, device, g):
        x = (
            wide_view(shape[0], depth, dtype, device, g)
            if strided_x
            else randn(shape, dtype, device, g)
        )
        w_q = torch.randint(0, 256, (depth, channels), generator=g, dtype=torch.uint8)
        if symmetric:
            zeros = torch.full((groups, channels), 128, dtype=torch.uint8)
        else:
            zeros = torch.randint(0, 256, (groups, channels), generator=g, dtype=torch.uint8)
        scales = torch.rand(groups, channels, generator=g) * 0.002 + 0.0002
        order = torch.randperm(depth, generator=g).to(device) if ordered else None
        b = randn((channels,), dtype, device, g) if bias else None
        return (x, w_q.to(device), scales.to(device=device, dtype=dtype), zeros.to(device),
                order, b)  # fmt: skip

    return make


def _int4(name: str, make, big: bool = False) -> Case:
    return Case(name, make, big=big, tolerance=FP16_WEIGHTS)


CASES = {
    "int8_quant_per_token": [
        _near("1 token", _per_token((1, 256))),
        _near("5 x 999 (odd K)", _per_token((5, 999))),
        _near("a row of zeros", _per_token((4, 64), zero_row=2)),
        _near("strided rows", _per_token((7, 200), strided=True)),
        _near("3-D [2, 3, 96]", _per_token((2, 3, 96))),
        Case("half-way ties", _per_token_ties),
        _near("4096 x 4096", _per_token((4096, 4096)), big=True),
    ],
    "int8_quant_static": [
        _near("1 token, symmetric", _static((1, 128), 0.02, None)),
        _near("7 x 999, zero point -7", _static((7, 999), 0.015, -7)),
        _near("saturating, zero point 13", _static((6, 64), 0.004, 13)),
        _near("strided rows", _static((5, 200), 0.03, None, strided=True)),
        _near("3-D [2, 3, 96], zero point 5", _static((2, 3, 96), 0.02, 5)),
        Case("half-way ties", _static_ties(None)),
        Case("half-way ties, zero point -3", _static_ties(-3)),
        _near("4096 x 4096, zero point -1", _static((4096, 4096), 0.02, -1), big=True),
    ],
    "int8_scaled_mm": [
        Case("1 token, bias", _scaled_mm(1, 256, 96)),
        Case("N 37, K 999 (odd), no bias", _scaled_mm(6, 999, 37, bias=False)),
        Case("per-tensor x absmax [1, 1]", _scaled_mm(5, 128, 64, per_tensor=True)),
        Case("zero point -5, bias", _scaled_mm(4, 200, 24, zero_point=-5, per_tensor=True)),
        Case("zero point 9, no bias", _scaled_mm(3, 64, 17, False, 9, per_tensor=True)),
        Case("a row of zeros", _scaled_mm(4, 96, 32, zero_row=1)),
        Case("strided x_q", _scaled_mm(7, 120, 40, strided=True)),
        Case("K 8192, sums above 2^24", _long_exact_sum),
        Case("256 x 4096 -> 4096", _scaled_mm(256, 4096, 4096), big=True),
    ],
    "wna16_gemm": [
        _int4("1 token, N 40, K 96 in 3 groups, bias", _wna16_gemm((1, 96), 40, 3)),
        _int4("one group, no bias", _wna16_gemm((5, 128), 64, 1, bias=False)),
        _int4("32 groups of 8", _wna16_gemm((4, 256), 48, 32)),
        _int4("zero points 0 and 15", _wna16_gemm((3, 64), 24, 2, zero_points="extremes")),
        _int4("act-order input_order", _wna16_gemm((6, 128), 32, 4, ordered=True)),
        _int4("strided x, no bias", _wna16_gemm((7, 96), 40, 3, bias=False, strided_x=True)),
        _int4("3-D x [2, 3, 64], input_order", _wna16_gemm((2, 3, 64), 16, 2, ordered=True)),
        _int4("strided packed weight", _wna16_gemm((3, 64), 40, 4, strided=True)),
        _int4("300 rows", _wna16_gemm((300, 128), 56, 2)),
        _int4("8 tokens, 1536 -> 1536, group 128", _wna16_gemm((8, 1536), 1536, 12)),
        _int4("512 x 4096 -> 4096, group 128", _wna16_gemm((512, 4096), 4096, 32), big=True),
    ],
    "wna16_dequant": [
        _int4("N 40, K 96 in 3 groups", _wna16_dequant(96, 40, 3)),
        _int4("one group", _wna16_dequant(128, 24, 1)),
        _int4("16 groups of 8", _wna16_dequant(128, 64, 16)),
        _int4("zero points 0 and 15", _wna16_dequant(64, 48, 4, zero_points="extremes")),
        _int4("strided packed weight", _wna16_dequant(64, 40, 2, strided=True)),
        _int4("4096 x 4096, group 128", _wna16_dequant(4096, 4096, 32), big=True),
    ],
    "w8a16_gemm": [
        Case("1 token, N 37, K 96 in 3 groups, bias", _w8a16_gemm((1, 96), 37, 3)),
        Case("one group (per channel), no bias", _w8a16_gemm((5, 128), 64, 1, bias=False)),
        Case("symmetric, zero point 128", _w8a16_gemm((4, 256), 48, 2, symmetric=True)),
        Case("act-order input_order", _w8a16_gemm((6, 128), 32, 4, ordered=True)),
        Case("strided x", _w8a16_gemm((7, 96), 40, 3, strided_x=True)),
        Case("3-D x [2, 3, 64]", _w8a16_gemm((2, 3, 64), 16, 2)),
        Case("8 tokens, 1536 -> 1536, group 128", _w8a16_gemm((8, 1536), 1536, 12)),
        Case("512 x 4096 -> 4096, group 128", _w8a16_gemm((512, 4096), 4096, 32), big=True),
    ],
}
