"""What the quantization family's tests share: plain float64 / integer formulas written
independently of the kernels (their own half-to-even rounding, int64 dot products), and the
inputs the tests build."""

import torch


def round_half_even(v: torch.Tensor) -> torch.Tensor:
    """Nearest integer, ties to the even one, from floor and the fraction (not torch.round)."""
    low = torch.floor(v)
    fraction = v - low
    odd = torch.remainder(low, 2) == 1
    up = (fraction > 0.5) | ((fraction == 0.5) & odd)
    return low + up.to(v.dtype)


def plain_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int64 [R, K], absmax float64 [R, 1], the unrounded quotient x / scale in float64)."""
    rows = x.double().reshape(-1, x.shape[-1])
    absmax = rows.abs().max(dim=-1, keepdim=True).values
    scale = absmax / 127
    quotient = torch.where(scale > 0, rows / torch.where(scale > 0, scale, 1.0), 0.0)
    return round_half_even(quotient).clamp(-127, 127).long(), absmax, quotient


def plain_static(x: torch.Tensor, scale: float, zero_point: int | None):
    """(q int64 [R, K], the unrounded quotient x / scale in float64)."""
    quotient = x.double().reshape(-1, x.shape[-1]) / scale
    q = round_half_even(quotient) + (zero_point or 0)
    return q.clamp(-128, 127).long(), quotient


def plain_scaled_mm(x_q, x_absmax, w_q, w_absmax, zero_point, bias) -> torch.Tensor:
    """The exact int64 dot products, scaled in float64."""
    acc = (x_q.long() - (0 if zero_point is None else int(zero_point))) @ w_q.long().t()
    out = acc.double() * (x_absmax.double() / 127) * (w_absmax.double().reshape(-1) / 127)
    return out if bias is None else out + bias.double()


def near_tie(quotient: torch.Tensor, width: float = 1e-4) -> torch.Tensor:
    """Where float32 and float64 quotients may round to different integers."""
    return ((quotient - torch.floor(quotient)) - 0.5).abs() < width


def assert_quantized(got: torch.Tensor, want: torch.Tensor, quotient: torch.Tensor) -> None:
    """int8, contiguous, equal to the float64 formula except by one at a float32 near-tie."""
    assert got.dtype == torch.int8 and got.is_contiguous()
    assert got.shape == want.shape
    diff = (got.long() - want).abs()
    if diff.numel():
        assert int(diff.max()) <= 1
    assert not bool((diff > 0)[~near_tie(quotient)].any()), "differs away from a tie"


def ties(rows: int) -> torch.Tensor:
    """Rows with absmax 127 (scale exactly 1) holding every k + 0.5 for k in [-64, 63], exact in
    bf16, fp16 and fp32: each x / scale is a half-way tie."""
    halves = torch.arange(-64, 64, dtype=torch.float64) + 0.5
    row = torch.cat([torch.tensor([127.0, -127.0], dtype=torch.float64), halves])
    return torch.stack([row.roll(5 * r) for r in range(rows)])


def int8(shape: tuple[int, ...], low: int = -128) -> torch.Tensor:
    return torch.randint(low, 128, shape, dtype=torch.int8)


def mm_inputs(
    rows: int,
    depth: int,
    channels: int,
    dtype: torch.dtype,
    bias: bool = True,
    zero_point: int | None = None,
    per_tensor: bool = False,
    strided: bool = False,
):
    """int8_scaled_mm's arguments: x_q, x_absmax, w_q, w_absmax, zero point, bias, out dtype."""
    x_q = int8((rows, depth + 8))[:, 8:] if strided else int8((rows, depth))
    x_absmax = torch.rand(1 if per_tensor else rows, 1) * 4 + 0.05
    w_q = int8((channels, depth), low=-127)
    w_absmax = torch.rand(channels) * 4 + 0.05
    zp = None if zero_point is None else torch.tensor([zero_point], dtype=torch.int32)
    b = torch.randn(channels).to(dtype) if bias else None
    return x_q, x_absmax, w_q, w_absmax, zp, b, dtype


#: int8_scaled_mm shapes: rows, depth (K), channels (N), mm_inputs options.
MM_CASES = {
    # rows, depth, channels, keyword options
    "1x1x1": (1, 1, 1, {}),
    "1 token, N odd": (1, 64, 37, {}),
    "K 999, no bias": (6, 999, 37, {"bias": False}),
    "K 1030 (two chunks), per tensor": (5, 1030, 16, {"per_tensor": True}),
    "zero point -5": (4, 200, 24, {"zero_point": -5, "per_tensor": True}),
    "zero point 9, no bias": (3, 33, 17, {"zero_point": 9, "per_tensor": True, "bias": False}),
    "strided x_q": (7, 120, 40, {"strided": True}),
}


# Weight-only int4 (wNa16) ----------------------------------------------------------------------

#: The documented layout (int4_layout.py), written out here: bits 4i .. 4i+3 of word [k, c]
#: hold channel 8c + DOCUMENTED_ORDER[i].
DOCUMENTED_ORDER = (4, 0, 5, 1, 6, 2, 7, 3)


def plain_pack(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit values [R, N] -> int32 words [R, N / 8], one nibble at a time in int64."""
    rows, channels = values.shape
    words = torch.zeros(rows, channels // 8, dtype=torch.int64)
    for nibble, channel in enumerate(DOCUMENTED_ORDER):
        words |= values[:, channel::8].long() << (4 * nibble)
    return (words - (words >= 2**31).long() * 2**32).to(torch.int32)  # the int32 bit pattern


def plain_unpack(words: torch.Tensor) -> torch.Tensor:
    """int32 words [R, N / 8] -> int64 [R, N]."""
    unsigned = words.long() & 0xFFFFFFFF
    values = torch.empty(words.shape[0], words.shape[1] * 8, dtype=torch.int64)
    for nibble, channel in enumerate(DOCUMENTED_ORDER):
        values[:, channel::8] = (unsigned >> (4 * nibble)) & 0xF
    return values


def plain_dequant(w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """W [K, N] = (q - z[k // (K / G)]) * s[k // (K / G)], exact in float64."""
    depth, groups = w_packed.shape[0], scales.shape[0]
    group = torch.arange(depth) // (depth // groups)
    q, z = plain_unpack(w_packed), plain_unpack(zeros)[group]
    return (q - z).double() * scales.double()[group]


def plain_wna16_gemm(x, w_packed, scales, zeros, input_order, bias) -> torch.Tensor:
    """x' @ W (+ bias) in float64, W rounded to x's dtype first (as the op specifies)."""
    w = plain_dequant(w_packed, scales, zeros).to(x.dtype).double()
    rows = x.double() if input_order is None else x.double()[..., input_order]
    out = rows @ w
    return out if bias is None else out + bias.to(x.dtype).double()


def int4_operands(depth: int, channels: int, groups: int, dtype: torch.dtype,
                  zero_points: str = "random", strided: bool = False):  # fmt: skip
    """w_packed, scales, zeros; zero_points "random", "extremes" (0 and 15) or "symmetric" (8);
    strided: column slices of packed tensors twice as wide."""
    width = 2 * channels if strided else channels
    q = torch.randint(0, 16, (depth, width))
    z = {
        "random": torch.randint(0, 16, (groups, width)),
        "extremes": torch.arange(groups * width).view(groups, width) % 2 * 15,
        "symmetric": torch.full((groups, width), 8),
    }[zero_points]
    scales = (torch.rand(groups, width) * 0.02 + 0.002).to(dtype)
    w_packed, zeros = plain_pack(q), plain_pack(z)
    if strided:
        words = channels // 8
        return w_packed[:, words:], scales[:, channels:], zeros[:, words:]
    return w_packed, scales, zeros


def wna16_inputs(shape: tuple[int, ...], channels: int, groups: int, dtype: torch.dtype,
                 bias: bool = True, ordered: bool = False, strided_x: bool = False,
                 **operands):  # fmt: skip
    """wna16_gemm's arguments: x [*shape], w_packed, scales, zeros, input_order, bias."""
    operands = int4_operands(shape[-1], channels, groups, dtype, **operands)
    return _weight_only_gemm_inputs(shape, channels, dtype, operands, bias, ordered, strided_x)


def _weight_only_gemm_inputs(
    shape: tuple[int, ...],
    channels: int,
    dtype: torch.dtype,
    operands: tuple,
    bias: bool,
    ordered: bool,
    strided_x: bool,
):
    """(x [*shape], *operands, input_order, bias) for a weight-only GEMM."""
    depth = shape[-1]
    if strided_x:
        x = torch.randn(*shape[:-1], depth + 8).to(dtype)[..., 8:]
    else:
        x = torch.randn(shape).to(dtype)
    order = torch.randperm(depth) if ordered else None
    b = torch.randn(channels).to(dtype) if bias else None
    return x, *operands, order, b


#: wna16_gemm shapes: x's shape, channels (N), groups (G), wna16_inputs options.
WNA16_CASES = {
    "1 token, N 8, K 8, one group": ((1, 8), 8, 1, {}),
    "1 token, N 40, K 96 in 3 groups": ((1, 96), 40, 3, {}),
    "one group, no bias": ((5, 128), 24, 1, {"bias": False}),
    "groups of 1 row": ((3, 16), 16, 16, {}),
    "zero points 0 and 15": ((4, 64), 40, 2, {"zero_points": "extremes"}),
    "symmetric (zero point 8)": ((2, 64), 16, 4, {"zero_points": "symmetric"}),
    "input_order": ((6, 96), 24, 3, {"ordered": True}),
    "strided x, no bias": ((7, 96), 40, 3, {"strided_x": True, "bias": False}),
    "3-D x, input_order": ((2, 3, 64), 16, 2, {"ordered": True}),
    "strided packed weight": ((3, 64), 40, 4, {"strided": True}),
}


# Weight-only int8 (W8A16) ----------------------------------------------------------------------


def plain_dequant_int8(w_q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """W [K, N] = (q - z[g]) * s[g] for the K / G rows of each group g, one group at a time,
    in int64 and float64: exact ((q - z) has 9 bits, s at most 24)."""
    depth, groups = w_q.shape[0], scales.shape[0]
    size = depth // groups
    w = torch.empty(depth, w_q.shape[1], dtype=torch.float64)
    for g in range(groups):
        rows = slice(g * size, (g + 1) * size)
        w[rows] = (w_q[rows].long() - zeros[g].long()).double() * scales[g].double()
    return w


def plain_w8a16_gemm(x, w_q, scales, zeros, input_order, bias) -> torch.Tensor:
    """x' @ W (+ bias) in float64, W rounded to x's dtype first (as the op specifies: a
    dequantize-then-GEMM kernel multiplies x's dtype), where the op accumulates in float32."""
    w = plain_dequant_int8(w_q, scales, zeros).to(x.dtype).double()
    rows = x.double() if input_order is None else x.double()[..., input_order]
    out = rows @ w
    return out if bias is None else out + bias.to(x.dtype).double()


def int8_operands(depth: int, channels: int, groups: int, dtype: torch.dtype,
                  zero_points: str = "random", weights: str = "random",
                  strided: bool = False):  # fmt: skip
    """w_q uint8 [K, N], scales [G, N], zeros uint8 [G, N]. zero_points "random", "extremes"
    (0 and 255: z[g, n] = 255 where n // 2 + g is odd) or "symmetric" (128); weights "random" or
    "extremes" (q[k, n] = 255 where k + n is odd: with extreme zero points every pairing of
    0 and 255, q - z = -255, 0 and 255); strided: column slices of tensors twice as wide."""
    width = 2 * channels if strided else channels
    rows, columns = torch.arange(depth).view(-1, 1), torch.arange(width)
    extremes = (rows + columns) % 2 * 255
    q = {"random": torch.randint(0, 256, (depth, width)), "extremes": extremes}[weights]
    z = {
        "random": torch.randint(0, 256, (groups, width)),
        "extremes": (columns // 2 + torch.arange(groups).view(-1, 1)) % 2 * 255,
        "symmetric": torch.full((groups, width), 128),
    }[zero_points]
    scales = (torch.rand(groups, width) * 0.002 + 0.0002).to(dtype)
    w_q, zeros = q.to(torch.uint8), z.to(torch.uint8)
    if strided:
        return w_q[:, channels:], scales[:, channels:], zeros[:, channels:]
    return w_q, scales, zeros


def w8a16_inputs(shape: tuple[int, ...], channels: int, groups: int, dtype: torch.dtype,
                 bias: bool = True, ordered: bool = False, strided_x: bool = False,
                 **operands):  # fmt: skip
    """w8a16_gemm's arguments: x [*shape], w_q, scales, zeros, input_order, bias."""
    operands = int8_operands(shape[-1], channels, groups, dtype, **operands)
    return _weight_only_gemm_inputs(shape, channels, dtype, operands, bias, ordered, strided_x)


#: w8a16_gemm shapes: x's shape, channels (N), groups (G), w8a16_inputs options.
W8A16_CASES = {
    "1x1x1": ((1, 1), 1, 1, {}),
    "1 token, N 37, K 96 in 3 groups": ((1, 96), 37, 3, {}),
    "one group (per channel), K 120, no bias": ((5, 120), 24, 1, {"bias": False}),
    "groups of 1 row": ((3, 24), 37, 24, {}),
    "zero points and weights 0 and 255": (
        (4, 64),
        40,
        2,
        {"zero_points": "extremes", "weights": "extremes"},
    ),  # fmt: skip
    "symmetric (zero point 128), K 200": ((2, 200), 16, 4, {"zero_points": "symmetric"}),
    "input_order, N 37": ((6, 96), 37, 3, {"ordered": True}),
    "strided x, no bias": ((7, 96), 40, 3, {"strided_x": True, "bias": False}),
    "3-D x, input_order": ((2, 3, 64), 16, 2, {"ordered": True}),
    "strided weight": ((3, 64), 40, 4, {"strided": True}),
}
