"""The quantization family's reference kernels (vllm_kunlun/ops/quant/reference.py) against
plain float64 / integer formulas (tests/ops/quant/shared.py): per-token and static int8
quantization (rounding half to even, the clamp, zero rows, ties, the dequantization error) and
the W8A8 GEMM (exact accumulation, zero points, per-tensor and per-token absmax, bias), the
weight-only int4 ops (the packed layout, dequantization, the GEMM with input_order and bias, the
shape refusals) and the weight-only int8 GEMM (W8A16: uint8 weights and zero points 0 to 255,
group scales, input_order, bias, the shape and dtype refusals) across fp32/bf16/fp16 and awkward
shapes; the custom ops' fake implementations; no host syncs; and check-kernels' comparison of
quantized (integer) outputs."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.library import opcheck

from tests.ops.helpers import DTYPES, assert_close_to
from tests.ops.quant.shared import (
    MM_CASES,
    W8A16_CASES,
    WNA16_CASES,
    assert_quantized,
    int4_operands,
    int8_operands,
    mm_inputs,
    plain_dequant,
    plain_dequant_int8,
    plain_pack,
    plain_per_token,
    plain_scaled_mm,
    plain_static,
    plain_unpack,
    plain_w8a16_gemm,
    plain_wna16_gemm,
    round_half_even,
    ties,
    w8a16_inputs,
    wna16_inputs,
)
from vllm_kunlun.ops.check.runner import FAIL, PASS, cases_by_op, run_case
from vllm_kunlun.ops.check.syncs import HostSyncCounter
from vllm_kunlun.ops.provider import Provider, declared_ops
from vllm_kunlun.ops.quant import reference
from vllm_kunlun.ops.quant.int4_layout import pack_int4, unpack_int4

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_plain_rounding_is_half_to_even():
    values = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 2.4999, 2.5001, -3.7])
    assert round_half_even(values.double()).tolist() == [-2, -2, -0, 0, 2, 2, 2, 3, -4]


# Per-token quantization ----------------------------------------------------------------------

TOKEN_SHAPES = [(1, 64), (7, 1), (5, 999), (4, 33), (2, 3, 96), (6, 4096)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", TOKEN_SHAPES, ids=str)
def test_per_token(dtype, shape):
    x = (torch.randn(shape) * 3).to(dtype)
    q, absmax = reference.int8_quant_per_token(x)
    want_q, want_absmax, quotient = plain_per_token(x)
    assert absmax.dtype == torch.float32 and absmax.is_contiguous()
    assert absmax.shape == want_absmax.shape == (x.numel() // shape[-1], 1)
    assert torch.equal(absmax.double(), want_absmax)  # the max of exact values: exact
    assert_quantized(q, want_q, quotient)
    assert bool((q.abs().amax(dim=-1) == 127).all())  # each row's largest value maps to +-127


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_non_contiguous_input(dtype):
    for x in (torch.randn(6, 80).to(dtype)[:, 16:], torch.randn(64, 6).to(dtype).t(),
              torch.randn(2, 5, 48).to(dtype).transpose(0, 1)):  # fmt: skip
        assert not x.is_contiguous()
        q, absmax = reference.int8_quant_per_token(x)
        want_q, want_absmax, quotient = plain_per_token(x)
        assert_quantized(q, want_q, quotient)
        assert torch.equal(absmax.double(), want_absmax)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_rows_of_zeros(dtype):
    x = torch.randn(4, 40).to(dtype)
    x[1] = 0.0
    x[3] = -0.0
    q, absmax = reference.int8_quant_per_token(x)
    assert absmax[1].item() == absmax[3].item() == 0.0
    assert not bool(q[1].any()) and not bool(q[3].any())
    assert bool((absmax[[0, 2]] > 0).all())
    q, absmax = reference.int8_quant_per_token(torch.zeros(3, 8, dtype=dtype))
    assert not bool(q.any()) and not bool(absmax.any())


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_half_way_ties_round_to_even(dtype):
    x = ties(3).to(dtype)
    q, absmax = reference.int8_quant_per_token(x)
    assert torch.equal(absmax, torch.full((3, 1), 127.0))
    assert torch.equal(q.long(), round_half_even(x.double()).long())  # exact, ties included
    row = dict(zip(x[0].tolist(), q[0].tolist(), strict=True))
    assert row[0.5] == 0 and row[1.5] == 2 and row[2.5] == 2 and row[-0.5] == 0
    assert row[-1.5] == -2 and row[63.5] == 64 and row[127.0] == 127 and row[-127.0] == -127


def test_per_token_values_at_the_absmax_and_a_tie_below_it():
    """x / scale is 127 (or -127) exactly at the absmax; 1.0 / (2 / 127) = 63.5 is a tie."""
    x = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.0]])
    q, absmax = reference.int8_quant_per_token(x)
    assert absmax.item() == 2.0
    assert q.tolist() == [[127, -127, 64, -64, 0]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_dequantization_error_is_at_most_half_a_step(dtype):
    x = (torch.randn(16, 300) * torch.rand(16, 1) * 10).to(dtype)
    q, absmax = reference.int8_quant_per_token(x)
    scale = absmax.double() / 127
    error = (q.double() * scale - x.double()).abs()
    assert bool((error <= scale / 2 * (1 + 1e-5)).all())


# Static quantization -------------------------------------------------------------------------

STATIC_CASES = [
    # shape, scale, zero point
    ((1, 64), 0.02, None),
    ((7, 1), 0.05, 3),
    ((5, 999), 0.015, -7),
    ((4, 33), 0.004, 13),  # saturates at both ends
    ((2, 3, 96), 0.02, -128),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", STATIC_CASES, ids=str)
def test_static(dtype, case):
    shape, scale, zero_point = case
    x = (torch.randn(shape) * 2).to(dtype)
    scale_t = torch.tensor([scale], dtype=torch.float32)
    zp = None if zero_point is None else torch.tensor([zero_point], dtype=torch.int32)
    got = reference.int8_quant_static(x, scale_t, zp)
    want, quotient = plain_static(x, scale_t.item(), zero_point)  # the float32 scale's value
    assert got.shape == (x.numel() // shape[-1], shape[-1])
    assert_quantized(got, want, quotient)


@pytest.mark.parametrize("dtype", DTYPES)
def test_static_saturates_and_keeps_the_zero_point(dtype):
    x = torch.tensor([[-1000.0, 1000.0, 0.0, -0.0]]).to(dtype)
    scale = torch.tensor([0.5])
    got = reference.int8_quant_static(x, scale, torch.tensor([5], dtype=torch.int32))
    assert got.tolist() == [[-128, 127, 5, 5]]
    assert reference.int8_quant_static(x, scale, None).tolist() == [[-128, 127, 0, 0]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("zero_point", [None, -3, 4])
def test_static_half_way_ties_round_to_even_before_the_zero_point(dtype, zero_point):
    x = (ties(2) * 0.25).to(dtype)  # x / 0.25 is k + 0.5 exactly
    zp = None if zero_point is None else torch.tensor([zero_point], dtype=torch.int32)
    got = reference.int8_quant_static(x, torch.tensor([0.25]), zp)
    want = (round_half_even(x.double() / 0.25) + (zero_point or 0)).clamp(-128, 127)
    assert torch.equal(got.long(), want.long())


@pytest.mark.parametrize("dtype", DTYPES)
def test_static_non_contiguous_input_and_dequantization_error(dtype):
    x = torch.randn(6, 80).to(dtype)[:, 16:]
    scale, zero_point = 0.03, -9
    got = reference.int8_quant_static(x, torch.tensor([scale]), torch.tensor([zero_point],
                                      dtype=torch.int32))  # fmt: skip
    want, quotient = plain_static(x, torch.tensor(scale).item(), zero_point)
    assert_quantized(got, want, quotient)
    step = torch.tensor(scale).double()
    inside = (got > -128) & (got < 127)
    error = ((got.double() - zero_point) * step - x.double()).abs()[inside]
    assert bool((error <= step / 2 * (1 + 1e-5)).all())


# W8A8 GEMM -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MM_CASES.values(), ids=MM_CASES.keys())
def test_scaled_mm(dtype, case):
    rows, depth, channels, options = case
    args = mm_inputs(rows, depth, channels, dtype, **options)
    got = reference.int8_scaled_mm(*args)
    assert got.is_contiguous()
    assert_close_to(got, plain_scaled_mm(*args[:6]), dtype)


def test_scaled_mm_bias_and_output_dtypes_may_differ():
    args = list(mm_inputs(3, 64, 8, torch.float32))
    args[5] = args[5].to(torch.bfloat16)
    got = reference.int8_scaled_mm(*args)
    assert_close_to(got, plain_scaled_mm(*args[:6]), torch.float32)


@pytest.mark.parametrize("zero_point", [None, -3])
def test_scaled_mm_accumulates_exactly_at_large_k(zero_point):
    """K = 8192 of +-127 / -128, mostly one sign: the sums exceed 2^24 (where float32 additions
    round). With absmaxes of 127 the scales are exactly 1, so a float32 output must be the exact
    integer sum rounded once."""
    depth = 8192
    signs = torch.where(torch.rand(5, depth) < 0.9, 1, -1)
    values = (signs * 127).to(torch.int8)
    values[1, ::7] = -128
    x_q, w_q = values[:2], values[2:]
    zp = None if zero_point is None else torch.tensor([zero_point], dtype=torch.int32)
    got = reference.int8_scaled_mm(x_q, torch.full((2, 1), 127.0), w_q, torch.full((3,), 127.0),
                                   zp, None, torch.float32)  # fmt: skip
    exact = (x_q.long() - (zero_point or 0)) @ w_q.long().t()
    assert int(exact.abs().min()) > 2**24
    assert torch.equal(got, exact.to(torch.float32))


def test_scaled_mm_scales_in_float32_and_rounds_once():
    args = list(mm_inputs(4, 300, 24, torch.float32))
    in_float32 = reference.int8_scaled_mm(*args)
    for dtype in (torch.bfloat16, torch.float16):
        args[-1] = dtype
        assert torch.equal(reference.int8_scaled_mm(*args), in_float32.to(dtype))


def test_scaled_mm_per_tensor_absmax_is_the_same_for_every_row():
    x_q, _, w_q, w_absmax, _, bias, _ = mm_inputs(5, 64, 12, torch.bfloat16)
    per_tensor = torch.tensor([[2.5]])
    got = reference.int8_scaled_mm(x_q, per_tensor, w_q, w_absmax, None, bias, torch.bfloat16)
    expanded = per_tensor.expand(5, 1).contiguous()
    want = reference.int8_scaled_mm(x_q, expanded, w_q, w_absmax, None, bias, torch.bfloat16)
    assert torch.equal(got, want)


def test_scaled_mm_zero_row_gives_the_bias():
    x_q, x_absmax, w_q, w_absmax, _, bias, _ = mm_inputs(3, 64, 12, torch.float32)
    x_q[1], x_absmax[1] = 0, 0.0
    got = reference.int8_scaled_mm(x_q, x_absmax, w_q, w_absmax, None, bias, torch.float32)
    assert torch.equal(got[1], bias)


# Zero tokens, host syncs ---------------------------------------------------------------------


def test_zero_tokens():
    q, absmax = reference.int8_quant_per_token(torch.randn(0, 64).bfloat16())
    assert q.shape == (0, 64) and absmax.shape == (0, 1)
    q = reference.int8_quant_static(torch.randn(0, 8), torch.tensor([0.1]), None)
    assert q.shape == (0, 8) and q.dtype == torch.int8
    args = mm_inputs(0, 64, 12, torch.bfloat16)
    assert reference.int8_scaled_mm(*args).shape == (0, 12)


def test_no_host_sync():
    x = torch.randn(5, 300).bfloat16()
    zp = torch.tensor([-4], dtype=torch.int32)
    with HostSyncCounter() as counter:
        reference.int8_quant_per_token(x)
        reference.int8_quant_static(x, torch.tensor([0.02]), zp)
        reference.int8_quant_static(x, torch.tensor([0.02]), None)
        reference.int8_scaled_mm(*mm_inputs(5, 2100, 24, torch.bfloat16))
        reference.int8_scaled_mm(*mm_inputs(5, 64, 24, torch.float16, zero_point=3))
    assert counter.total == 0


# The custom ops: fake implementations ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_opcheck(reference_ops, dtype):
    per_token = torch.ops.kunlun.int8_quant_per_token.default
    opcheck(per_token, (torch.randn(2, 3, 40).to(dtype),))
    opcheck(per_token, (torch.randn(40, 6).to(dtype).t(),))
    static = torch.ops.kunlun.int8_quant_static.default
    opcheck(static, (torch.randn(2, 3, 40).to(dtype), torch.tensor([0.02]), None))
    opcheck(static, (torch.randn(5, 40).to(dtype), torch.tensor([0.02]),
                     torch.tensor([-3], dtype=torch.int32)))  # fmt: skip
    mm = torch.ops.kunlun.int8_scaled_mm.default
    opcheck(mm, mm_inputs(3, 64, 17, dtype))
    opcheck(mm, mm_inputs(4, 40, 9, dtype, bias=False, zero_point=-5, per_tensor=True))
    opcheck(mm, mm_inputs(1, 33, 5, torch.float32, strided=True))


def test_fake_implementations_give_shapes_and_dtypes():
    with FakeTensorMode():
        x = torch.empty(2, 3, 96, dtype=torch.bfloat16)
        q, absmax = torch.ops.kunlun.int8_quant_per_token(x)
        assert (q.shape, q.dtype) == ((6, 96), torch.int8)
        assert (absmax.shape, absmax.dtype) == ((6, 1), torch.float32)
        q = torch.ops.kunlun.int8_quant_static(x, torch.empty(1), None)
        assert (q.shape, q.dtype) == ((6, 96), torch.int8)
        x_q = torch.empty(6, 96, dtype=torch.int8)
        w_q = torch.empty(37, 96, dtype=torch.int8)
        out = torch.ops.kunlun.int8_scaled_mm(x_q, torch.empty(1, 1), w_q, torch.empty(37),
                                              None, None, torch.float16)  # fmt: skip
        assert (out.shape, out.dtype) == ((6, 37), torch.float16)


def test_the_custom_ops_run_the_reference(reference_ops):
    x = torch.randn(3, 50).bfloat16()
    for got, want in zip(torch.ops.kunlun.int8_quant_per_token(x),
                         reference.int8_quant_per_token(x), strict=True):  # fmt: skip
        assert torch.equal(got, want)
    args = mm_inputs(3, 50, 7, torch.bfloat16, zero_point=2, per_tensor=True)
    assert torch.equal(torch.ops.kunlun.int8_scaled_mm(*args), reference.int8_scaled_mm(*args))
    assert declared_ops()["int8_scaled_mm"].family == "quant"


# check-kernels: quantized values are integer outputs -------------------------------------------


def _off_by(amount: int):
    def kernel(x):
        q, absmax = reference.int8_quant_per_token(x)
        q = q.clone()
        q.view(-1)[0] += amount if q.view(-1)[0] < 127 - amount else -amount
        return q, absmax

    return kernel


@pytest.mark.parametrize(
    ("case_name", "amount", "status"),
    [
        ("5 x 999 (odd K)", 1, PASS),  # a near-tie may round either way in another kernel
        ("5 x 999 (odd K)", 2, FAIL),
        ("half-way ties", 1, FAIL),  # exact ties must round half to even
        ("half-way ties", 0, PASS),
    ],
)
def test_check_kernels_judges_quantized_values_on_their_own(case_name, amount, status):
    """Not scaled by their magnitude (127) with the dtype's rtol: int8 q must match exactly, or
    by one where a case allows it."""
    provider = Provider("reference")
    provider.kernels["int8_quant_per_token"] = _off_by(amount)
    case = next(c for c in cases_by_op()["int8_quant_per_token"] if c.name == case_name)
    spec = declared_ops()["int8_quant_per_token"]
    result = run_case(spec, case, "bfloat16", provider, torch.device("cpu"), repeats=1)
    assert result.status == status, result.message
    assert result.max_abs_error == amount
    if status == FAIL:
        assert f"integer outputs differ by {amount}" in result.message


# Weight-only int4 (wNa16) ------------------------------------------------------------------------


def test_int4_layout_is_the_documented_packing():
    values = torch.randint(0, 16, (5, 48))
    values[0] = 15  # every word's top nibble set: negative int32 words
    values[1] = 0
    packed = pack_int4(values)
    assert packed.dtype == torch.int32 and torch.equal(packed, plain_pack(values))
    assert bool((packed[0] < 0).all())
    assert torch.equal(unpack_int4(packed).long(), values)
    assert torch.equal(plain_unpack(packed), values)


def test_int4_layout_nibble_order_in_one_word():
    """Channel j = j: the word's nibbles, lowest first, are channels 4, 0, 5, 1, 6, 2, 7, 3."""
    word = int(pack_int4(torch.arange(8).view(1, 8)).item()) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [4, 0, 5, 1, 6, 2, 7, 3]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", WNA16_CASES.values(), ids=WNA16_CASES.keys())
def test_wna16_dequant_is_the_exact_value_rounded_once(dtype, case):
    shape, channels, groups, options = case
    operands = {k: v for k, v in options.items() if k in ("zero_points", "strided")}
    w_packed, scales, zeros = int4_operands(shape[-1], channels, groups, dtype, **operands)
    got = reference.wna16_dequant(w_packed, scales, zeros)
    assert got.dtype == dtype and got.is_contiguous() and got.shape == (shape[-1], channels)
    assert torch.equal(got, plain_dequant(w_packed, scales, zeros).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_wna16_dequant_extreme_nibbles(dtype):
    """q and z at 0 and 15: W = +-15 s and 0, exactly."""
    q = torch.tensor([[0] * 8, [15] * 8, [0] * 8, [15] * 8])
    z = torch.tensor([[15] * 8, [0] * 8])  # group 0: rows 0-1, group 1: rows 2-3
    scales = torch.tensor([[0.5] * 8, [0.25] * 8]).to(dtype)
    got = reference.wna16_dequant(plain_pack(q), scales, plain_pack(z))
    want = torch.tensor([[-7.5] * 8, [0.0] * 8, [0.0] * 8, [3.75] * 8])
    assert torch.equal(got, want.to(dtype))


def test_wna16_dequant_rounds_float32_scales_once_to_them():
    w_packed, scales, zeros = int4_operands(64, 16, 2, torch.float32)
    got = reference.wna16_dequant(w_packed, scales, zeros)
    assert torch.equal(got, plain_dequant(w_packed, scales, zeros).float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", WNA16_CASES.values(), ids=WNA16_CASES.keys())
def test_wna16_gemm(dtype, case):
    shape, channels, groups, options = case
    args = wna16_inputs(shape, channels, groups, dtype, **options)
    got = reference.wna16_gemm(*args)
    assert got.is_contiguous() and got.shape == (*shape[:-1], channels)
    assert_close_to(got, plain_wna16_gemm(*args), dtype)


def test_wna16_gemm_input_order_permutes_x():
    x, w_packed, scales, zeros, order, bias = wna16_inputs((2, 3, 64), 16, 4, torch.bfloat16,
                                                           ordered=True)  # fmt: skip
    got = reference.wna16_gemm(x, w_packed, scales, zeros, order, bias)
    permuted = x[..., order].contiguous()
    assert torch.equal(got, reference.wna16_gemm(permuted, w_packed, scales, zeros, None, bias))


def test_wna16_gemm_scales_and_bias_dtypes_may_differ_from_x():
    x, w_packed, scales, zeros, _, bias = wna16_inputs((3, 64), 24, 2, torch.bfloat16)
    args = (x, w_packed, scales.float(), zeros, None, bias.half())
    got = reference.wna16_gemm(*args)
    assert_close_to(got, plain_wna16_gemm(*args), torch.bfloat16)


@pytest.mark.parametrize("op", ["gemm", "dequant"])
def test_wna16_refuses_k_not_a_multiple_of_the_groups(op):
    w_packed, scales, zeros = int4_operands(100, 16, 1, torch.float16)
    scales, zeros = scales.expand(3, 16), zeros.expand(3, 2)  # G = 3 groups over K = 100 rows
    match = "K = 100 .* is not a multiple of the number of groups G = 3"
    with pytest.raises(ValueError, match=match):
        if op == "gemm":
            reference.wna16_gemm(torch.randn(2, 100).half(), w_packed, scales, zeros, None, None)
        else:
            reference.wna16_dequant(w_packed, scales, zeros)


def test_wna16_refuses_mismatched_shapes():
    x, w_packed, scales, zeros, _, _ = wna16_inputs((2, 64), 16, 2, torch.float32)
    bad = {
        "scales have N = 24 columns": (x, w_packed, torch.ones(2, 24), zeros, None),
        "zeros must be \\[G, N / 8\\]": (x, w_packed, scales, zeros[:, :1], None),
        "x has 63 features": (x[:, :63], w_packed, scales, zeros, None),
        "input_order must be \\[K\\]": (x, w_packed, scales, zeros, torch.arange(32)),
    }
    for match, args in bad.items():
        with pytest.raises(ValueError, match=match):
            reference.wna16_gemm(*args, None)


def test_wna16_zero_tokens():
    args = wna16_inputs((0, 64), 16, 2, torch.bfloat16)
    out = reference.wna16_gemm(*args)
    assert out.shape == (0, 16) and out.dtype == torch.bfloat16


def test_wna16_no_host_sync():
    args = wna16_inputs((2, 3, 96), 40, 3, torch.bfloat16, ordered=True)
    with HostSyncCounter() as counter:
        reference.wna16_gemm(*args)
        reference.wna16_dequant(*args[1:4])
    assert counter.total == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_wna16_opcheck(reference_ops, dtype):
    gemm = torch.ops.kunlun.wna16_gemm.default
    opcheck(gemm, wna16_inputs((3, 64), 40, 2, dtype))
    opcheck(gemm, wna16_inputs((2, 3, 96), 16, 3, dtype, ordered=True, bias=False))
    opcheck(gemm, wna16_inputs((4, 64), 24, 1, dtype, strided_x=True))
    dequant = torch.ops.kunlun.wna16_dequant.default
    opcheck(dequant, int4_operands(96, 40, 3, dtype))
    opcheck(dequant, int4_operands(64, 16, 2, dtype, strided=True))


def test_wna16_fake_implementations_give_shapes_and_dtypes():
    with FakeTensorMode():
        x = torch.empty(2, 3, 96, dtype=torch.bfloat16)
        w_packed = torch.empty(96, 5, dtype=torch.int32)
        scales, zeros = (
            torch.empty(3, 40, dtype=torch.float16),
            torch.empty(3, 5, dtype=torch.int32),
        )
        out = torch.ops.kunlun.wna16_gemm(x, w_packed, scales, zeros, None, None)
        assert (out.shape, out.dtype) == ((2, 3, 40), torch.bfloat16)
        w = torch.ops.kunlun.wna16_dequant(w_packed, scales, zeros)
        assert (w.shape, w.dtype) == ((96, 40), torch.float16)


def test_wna16_custom_ops_run_the_reference(reference_ops):
    args = wna16_inputs((3, 64), 16, 2, torch.bfloat16, ordered=True)
    assert torch.equal(torch.ops.kunlun.wna16_gemm(*args), reference.wna16_gemm(*args))
    assert torch.equal(torch.ops.kunlun.wna16_dequant(*args[1:4]),
                       reference.wna16_dequant(*args[1:4]))  # fmt: skip
    assert declared_ops()["wna16_gemm"].family == "quant"


# Weight-only int8 (W8A16) ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", W8A16_CASES.values(), ids=W8A16_CASES.keys())
def test_w8a16_gemm(dtype, case):
    shape, channels, groups, options = case
    args = w8a16_inputs(shape, channels, groups, dtype, **options)
    got = reference.w8a16_gemm(*args)
    assert got.is_contiguous() and got.shape == (*shape[:-1], channels)
    assert_close_to(got, plain_w8a16_gemm(*args), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("groups", "operands"),
    [
        (3, {}),
        (1, {"zero_points": "symmetric"}),
        (4, {"zero_points": "extremes", "weights": "extremes"}),
        (48, {"zero_points": "extremes"}),  # groups of 1 row
    ],
    ids=["3 groups", "one group, zero point 128", "0 and 255", "groups of 1 row"],
)
def test_w8a16_gemm_of_the_identity_is_the_weight_exactly(dtype, groups, operands):
    """x = I: each output row is one weight row, exact in the float32 accumulator, so the
    output is W itself: (q - z) * s computed in float32 (exact for 16-bit scales, rounded once
    for float32 ones) and rounded to x's dtype. Catches a wrong group, zero point or sign."""
    w_q, scales, zeros = int8_operands(48, 37, groups, dtype, **operands)
    got = reference.w8a16_gemm(torch.eye(48).to(dtype), w_q, scales, zeros, None, None)
    want = plain_dequant_int8(w_q, scales, zeros).float().to(dtype)
    assert got.dtype == dtype and torch.equal(got, want)


def test_w8a16_extreme_weights_and_zero_points():
    """q and z at 0 and 255: W = -255 s, 0 and 255 s, exact in bf16 with s = 0.5 and 0.25."""
    w_q = torch.tensor([[0, 255, 0, 255], [0, 255, 255, 0]], dtype=torch.uint8)
    zeros = torch.tensor([[255, 255, 0, 0], [0, 128, 255, 255]], dtype=torch.uint8)
    scales = torch.tensor([[0.5] * 4, [0.25] * 4]).bfloat16()  # group 0: row 0, group 1: row 1
    got = reference.w8a16_gemm(torch.eye(2).bfloat16(), w_q, scales, zeros, None, None)
    want = [[-127.5, 0.0, 0.0, 127.5], [0.0, 31.75, 0.0, -63.75]]
    assert got.tolist() == want


@pytest.mark.parametrize("scales_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_w8a16_gemm_scales_and_bias_dtypes_may_differ_from_x(dtype, scales_dtype):
    x, w_q, scales, zeros, order, bias = w8a16_inputs((3, 96), 40, 3, dtype, ordered=True)
    bias_dtype = next(d for d in DTYPES if d not in (dtype, scales_dtype))
    args = (x, w_q, scales.float().to(scales_dtype), zeros, order, bias.float().to(bias_dtype))
    got = reference.w8a16_gemm(*args)
    assert_close_to(got, plain_w8a16_gemm(*args), dtype)


def test_w8a16_gemm_input_order_permutes_x():
    x, w_q, scales, zeros, order, bias = w8a16_inputs((2, 3, 64), 16, 4, torch.bfloat16,
                                                      ordered=True)  # fmt: skip
    got = reference.w8a16_gemm(x, w_q, scales, zeros, order, bias)
    permuted = x[..., order].contiguous()
    assert torch.equal(got, reference.w8a16_gemm(permuted, w_q, scales, zeros, None, bias))
    unordered = reference.w8a16_gemm(x, w_q, scales, zeros, None, bias)
    assert not torch.allclose(got.float(), unordered.float(), rtol=0.1, atol=0.1)
    # x' = x[..., order], not its inverse: the last feature picks the first weight row
    reverse = torch.arange(64).flip(0)
    one_hot = torch.zeros(1, 64).bfloat16()
    one_hot[0, 63] = 1.0
    first_row = reference.w8a16_gemm(one_hot, w_q, scales, zeros, reverse, None)
    want = plain_dequant_int8(w_q, scales, zeros)[0].float().bfloat16()
    assert torch.equal(first_row[0], want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_w8a16_gemm_other_layouts(dtype):
    """A transposed 3-D x, and a weight stored [N, K] and passed transposed."""
    x = torch.randn(3, 2, 96).to(dtype).transpose(0, 1)
    w_q, scales, zeros = int8_operands(96, 37, 3, dtype)
    transposed = w_q.t().contiguous().t()
    bias = torch.randn(37).to(dtype)
    for args in ((x, w_q, scales, zeros, None, bias), (x, transposed, scales, zeros, None, None)):
        got = reference.w8a16_gemm(*args)
        assert got.is_contiguous() and got.shape == (2, 3, 37)
        assert_close_to(got, plain_w8a16_gemm(*args), dtype)


@pytest.mark.parametrize("groups", [3, 0])
def test_w8a16_refuses_k_not_a_multiple_of_the_groups(groups):
    w_q, scales, zeros = int8_operands(100, 16, 1, torch.float16)
    scales, zeros = scales.expand(groups, 16), zeros.expand(groups, 16)
    match = f"K = 100 .* is not a multiple of the number of groups G = {groups}"
    with pytest.raises(ValueError, match=match):
        reference.w8a16_gemm(torch.randn(2, 100).half(), w_q, scales, zeros, None, None)


def test_w8a16_refuses_mismatched_shapes():
    x, w_q, scales, zeros, _, _ = w8a16_inputs((2, 64), 16, 2, torch.float32)
    bad = {
        "scales and zeros must be \\[G, N\\] = \\[2, 16\\], got \\[2, 24\\] and \\[2, 16\\]": (
            x, w_q, torch.ones(2, 24), zeros, None),
        "got \\[2, 16\\] and \\[2, 8\\]": (x, w_q, scales, zeros[:, :8], None),
        "got \\[2, 16\\] and \\[1, 16\\]": (x, w_q, scales, zeros[:1], None),
        "x has 63 features, the weight K = 64": (x[:, :63], w_q, scales, zeros, None),
        "input_order must be \\[K\\] = \\[64\\]": (x, w_q, scales, zeros, torch.arange(32)),
    }  # fmt: skip
    for match, args in bad.items():
        with pytest.raises(ValueError, match=match):
            reference.w8a16_gemm(*args, None)


@pytest.mark.parametrize("operand", ["w_q", "zeros"])
@pytest.mark.parametrize("wrong", [torch.int8, torch.int32])
def test_w8a16_refuses_weights_and_zero_points_that_are_not_uint8(operand, wrong):
    """int8 (signed, GPTQ's -128 .. 127) or int32 (wNa16's packed words) are another layout."""
    x, w_q, scales, zeros, _, bias = w8a16_inputs((2, 64), 16, 2, torch.bfloat16)
    w_q = w_q.to(wrong) if operand == "w_q" else w_q
    zeros = zeros.to(wrong) if operand == "zeros" else zeros
    with pytest.raises(ValueError, match=f"w_q and zeros must be uint8, got .*{wrong}"):
        reference.w8a16_gemm(x, w_q, scales, zeros, None, bias)


def test_w8a16_refuses_operands_that_are_not_2d():
    """A per-channel scale given as [N] (not [1, N]) would otherwise read as N groups."""
    x, w_q, scales, zeros, _, bias = w8a16_inputs((2, 64), 16, 1, torch.bfloat16)
    with pytest.raises(ValueError, match=r"scales must be 2-D, got \[16\]"):
        reference.w8a16_gemm(x, w_q, scales[0], zeros, None, bias)
    with pytest.raises(ValueError, match=r"w_q must be 2-D, got \[1, 64, 16\]"):
        reference.w8a16_gemm(x, w_q[None], scales, zeros, None, bias)


def test_w8a16_zero_tokens():
    for shape in ((0, 64), (2, 0, 64)):
        args = w8a16_inputs(shape, 16, 2, torch.bfloat16, ordered=True)
        out = reference.w8a16_gemm(*args)
        assert out.shape == (*shape[:-1], 16) and out.dtype == torch.bfloat16


def test_w8a16_no_host_sync():
    args = w8a16_inputs((2, 3, 96), 40, 3, torch.bfloat16, ordered=True, strided_x=True)
    other = w8a16_inputs((5, 128), 37, 1, torch.float32, bias=False)
    with HostSyncCounter() as counter:
        reference.w8a16_gemm(*args)
        reference.w8a16_gemm(*other)
    assert counter.total == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_w8a16_opcheck(reference_ops, dtype):
    gemm = torch.ops.kunlun.w8a16_gemm.default
    opcheck(gemm, w8a16_inputs((3, 64), 37, 2, dtype))
    opcheck(gemm, w8a16_inputs((2, 3, 96), 16, 3, dtype, ordered=True, bias=False))
    opcheck(gemm, w8a16_inputs((4, 64), 24, 1, dtype, strided_x=True, strided=True))


def test_w8a16_fake_implementation_gives_shape_and_dtype():
    with FakeTensorMode():
        x = torch.empty(2, 3, 96, dtype=torch.bfloat16)
        w_q = torch.empty(96, 37, dtype=torch.uint8)
        scales = torch.empty(3, 37, dtype=torch.float16)
        zeros = torch.empty(3, 37, dtype=torch.uint8)
        out = torch.ops.kunlun.w8a16_gemm(x, w_q, scales, zeros, None, None)
        assert (out.shape, out.dtype) == ((2, 3, 37), torch.bfloat16)


def test_w8a16_custom_op_runs_the_reference(reference_ops):
    args = w8a16_inputs((3, 64), 16, 2, torch.bfloat16, ordered=True)
    assert torch.equal(torch.ops.kunlun.w8a16_gemm(*args), reference.w8a16_gemm(*args))
    assert declared_ops()["w8a16_gemm"].family == "quant"
