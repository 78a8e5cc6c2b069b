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
