"""The quantization family's Kunlun binding (vllm_kunlun/ops/quant/kunlun.py) against the
recorded kunlun_ops API (KUNLUN.md §2g), through the stand-in library (tests/standin): every call
is checked against the recorded contract (keyword forms, int8 operands, float32 absmax and bias,
int32 packed int4 words, fp16 int4 outputs, contiguity, preallocated outputs) and must give the
reference kernels' results (the int4 ops within the fp16 weights' rounding). The int8
weight-only GEMM (W8A16) has no recorded kernel: it is the reference function and calls none.
This is all the verification the binding has until it runs on a Kunlun XPU."""

import pytest
import torch

from tests.ops.helpers import DTYPES, assert_close_to, standin_calls
from tests.ops.quant.shared import (
    MM_CASES,
    W8A16_CASES,
    WNA16_CASES,
    int4_operands,
    int8_operands,
    mm_inputs,
    plain_dequant,
    plain_pack,
    ties,
    w8a16_inputs,
    wna16_inputs,
)
from vllm_kunlun.ops.provider import Provider
from vllm_kunlun.ops.quant import kunlun as quant_kunlun
from vllm_kunlun.ops.quant import reference

# Loading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["quant2d", "matmul", "awq_gemm", "awq_dequantize"])
def test_load_rejects_a_build_without_a_quant_kernel(use_standin, monkeypatch, name):
    ops = use_standin()
    monkeypatch.delattr(ops, name)
    with pytest.raises(RuntimeError, match=f"kunlun_ops.{name} is missing"):
        Provider("kunlun").prepare()


def test_load_rejects_matmul_without_the_recorded_keywords(use_standin, monkeypatch):
    ops = use_standin()
    monkeypatch.setattr(ops, "matmul", lambda x, w, out, x_trans, w_trans, alpha, beta, bias,
                        x_max, w_max: None)  # fmt: skip
    with pytest.raises(RuntimeError, match="matmul does not accept x_pc_max, w_pc_max"):
        Provider("kunlun").prepare()


def test_load_rejects_quant2d_without_force_sdnn(use_standin, monkeypatch):
    ops = use_standin()
    monkeypatch.setattr(ops, "quant2d", lambda x, y, max: None)
    with pytest.raises(RuntimeError, match="quant2d does not accept force_sdnn"):
        Provider("kunlun").prepare()


@pytest.mark.parametrize(
    ("name", "signature", "missing"),
    [
        ("awq_gemm", lambda x, w, scale, zeros, out, align_type: None, "group_size"),
        ("awq_dequantize", lambda qweight, scales, zeros, weight, group_m, align_type: None,
         "quant_type"),
    ],
)  # fmt: skip
def test_load_rejects_int4_kernels_without_the_recorded_keywords(
    use_standin, monkeypatch, name, signature, missing
):
    ops = use_standin()
    monkeypatch.setattr(ops, name, signature)
    with pytest.raises(RuntimeError, match=f"{name} does not accept {missing}"):
        Provider("kunlun").prepare()


def test_the_quant_ops_are_bound_or_name_the_reference(kunlun):
    assert kunlun.sources["int8_quant_per_token"] == "quant.kunlun"
    assert kunlun.sources["int8_scaled_mm"] == "quant.kunlun"
    assert kunlun.sources["wna16_gemm"] == "quant.kunlun"
    assert kunlun.sources["wna16_dequant"] == "quant.kunlun"
    # no recorded kunlun_ops kernel (only xspeedgate_ops.static_scaled_int8_quant)
    assert kunlun.sources["int8_quant_static"] == "quant.reference"
    # no recorded kunlun_ops kernel takes 8-bit weights (awq_gemm / awq_dequantize are 4-bit)
    assert kunlun.sources["w8a16_gemm"] == "quant.reference"


# Per-token quantization: quant2d -------------------------------------------------------------


def _token_inputs(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    zero_row = torch.randn(4, 64)
    zero_row[2] = 0.0
    return {
        "1 token": torch.randn(1, 256),
        "K 1": torch.randn(7, 1),
        "odd K": torch.randn(5, 999) * 3,
        "a row of zeros": zero_row,
        "3-D": torch.randn(2, 3, 96),
        "strided": torch.randn(6, 80)[:, 16:],
        "transposed": torch.randn(64, 6).t(),
        "ties": ties(3),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(_token_inputs(torch.float32)))
def test_per_token_uses_quant2d(kunlun, dtype, name):
    x = _token_inputs(dtype)[name].to(dtype)
    q, absmax = kunlun.int8_quant_per_token(x)
    want_q, want_absmax = reference.int8_quant_per_token(x)
    assert q.dtype == torch.int8 and q.is_contiguous() and torch.equal(q, want_q)
    assert absmax.dtype == torch.float32 and torch.equal(absmax, want_absmax)
    assert standin_calls() == {"quant2d": 1}


def test_per_token_zero_tokens_call_no_kernel(kunlun):
    q, absmax = kunlun.int8_quant_per_token(torch.randn(0, 64).bfloat16())
    assert q.shape == (0, 64) and q.dtype == torch.int8 and absmax.shape == (0, 1)
    assert standin_calls() == {}


# Static quantization: the reference on the XPU -----------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("zero_point", [None, -7])
def test_static_runs_the_reference_and_no_kunlun_kernel(kunlun, dtype, zero_point):
    x = torch.randn(2, 3, 96).to(dtype)
    zp = None if zero_point is None else torch.tensor([zero_point], dtype=torch.int32)
    got = kunlun.int8_quant_static(x, torch.tensor([0.02]), zp)
    assert torch.equal(got, reference.int8_quant_static(x, torch.tensor([0.02]), zp))
    assert standin_calls() == {}


# W8A8 GEMM: matmul ---------------------------------------------------------------------------

SYMMETRIC = {name: case for name, case in MM_CASES.items() if "zero_point" not in case[3]}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SYMMETRIC.values(), ids=SYMMETRIC.keys())
def test_symmetric_scaled_mm_uses_matmul(kunlun, dtype, case):
    rows, depth, channels, options = case
    args = mm_inputs(rows, depth, channels, dtype, **options)
    got = kunlun.int8_scaled_mm(*args)
    assert got.dtype == dtype and got.shape == (rows, channels) and got.is_contiguous()
    assert torch.equal(got, reference.int8_scaled_mm(*args))
    assert standin_calls() == {"matmul": 1}


def test_matmul_gets_the_recorded_arguments(kunlun, monkeypatch):
    """Keywords; w [N, K] with w_trans=True; a per-tensor [1, 1] absmax expanded to [R, 1];
    bias cast to float32; every tensor contiguous; out preallocated in out_dtype."""
    seen = {}
    matmul = quant_kunlun.library().matmul

    def spy(**kwargs):
        seen.update(kwargs)
        return matmul(**kwargs)

    monkeypatch.setattr(quant_kunlun.library(), "matmul", spy)
    args = mm_inputs(5, 64, 12, torch.bfloat16, per_tensor=True, strided=True)
    out = kunlun.int8_scaled_mm(*args)
    assert seen["out"] is out and out.dtype == torch.bfloat16
    assert (seen["x_trans"], seen["w_trans"], seen["alpha"], seen["beta"]) == (False, True, 1.0,
                                                                                0.0)  # fmt: skip
    assert seen["x"].is_contiguous() and torch.equal(seen["x"], args[0])
    assert seen["w"] is args[2]
    assert seen["x_pc_max"].shape == (5, 1) and seen["x_pc_max"].is_contiguous()
    assert torch.equal(seen["x_pc_max"], args[1].expand(5, 1))
    assert torch.equal(seen["w_pc_max"], args[3])
    assert seen["bias"].dtype == torch.float32 and torch.equal(seen["bias"], args[5].float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("zero_point", [-5, 9])
def test_zero_point_scaled_mm_runs_the_reference_and_no_kunlun_kernel(kunlun, dtype, zero_point):
    args = mm_inputs(4, 200, 24, dtype, zero_point=zero_point, per_tensor=True)
    assert torch.equal(kunlun.int8_scaled_mm(*args), reference.int8_scaled_mm(*args))
    assert standin_calls() == {}


def test_scaled_mm_zero_tokens_call_no_kernel(kunlun):
    out = kunlun.int8_scaled_mm(*mm_inputs(0, 64, 12, torch.float16))
    assert out.shape == (0, 12) and out.dtype == torch.float16
    assert standin_calls() == {}


# The stand-in's contract checks --------------------------------------------------------------


def test_standin_quant2d_checks_its_contract(use_standin):
    ops = use_standin()
    x = torch.randn(4, 32)
    good = dict(x=x, y=torch.empty(4, 32, dtype=torch.int8), max=torch.empty(4, 1),
                force_sdnn=True)  # fmt: skip
    ops.quant2d(**good)
    ops.quant2d(good["x"], good["y"], good["max"], True)  # the positional form is recorded too
    with pytest.raises(AssertionError, match="x must be contiguous"):
        ops.quant2d(**{**good, "x": torch.randn(32, 4).t()})
    with pytest.raises(AssertionError, match="y must be int8"):
        ops.quant2d(**{**good, "y": torch.empty(4, 32, dtype=torch.int32)})
    with pytest.raises(AssertionError, match="max must be preallocated as \\[4, 1\\]"):
        ops.quant2d(**{**good, "max": torch.empty(4)})
    with pytest.raises(AssertionError, match="max must be torch.float32"):
        ops.quant2d(**{**good, "max": torch.empty(4, 1, dtype=torch.bfloat16)})
    with pytest.raises(AssertionError, match="x must be 2-D"):
        ops.quant2d(**{**good, "x": x.view(2, 2, 32)})
    with pytest.raises(AssertionError, match="only force_sdnn=True"):
        ops.quant2d(**{**good, "force_sdnn": False})


def test_standin_matmul_checks_its_contract(use_standin):
    ops = use_standin()
    x_q, x_absmax, w_q, w_absmax, _, bias, _ = mm_inputs(3, 16, 5, torch.float32)
    good = dict(x=x_q, w=w_q, out=torch.empty(3, 5, dtype=torch.bfloat16), x_trans=False,
                w_trans=True, alpha=1.0, beta=0.0, bias=bias, x_pc_max=x_absmax,
                w_pc_max=w_absmax)  # fmt: skip
    ops.matmul(**good)
    with pytest.raises(AssertionError, match="recorded form"):
        ops.matmul(*good.values())
    with pytest.raises(AssertionError, match="only x_trans=False, w_trans=True"):
        ops.matmul(**{**good, "w": w_q.t().contiguous(), "w_trans": False})
    with pytest.raises(AssertionError, match="x must be int8"):
        ops.matmul(**{**good, "x": x_q.float()})
    with pytest.raises(AssertionError, match="x_pc_max must be \\[M=3, 1\\] per token"):
        ops.matmul(**{**good, "x_pc_max": x_absmax[:1]})
    with pytest.raises(AssertionError, match="bias must be torch.float32"):
        ops.matmul(**{**good, "bias": bias.bfloat16()})
    with pytest.raises(AssertionError, match="needs x_pc_max and w_pc_max"):
        ops.matmul(**{**good, "w_pc_max": None})
    with pytest.raises(AssertionError, match="out must be preallocated as \\(3, 5\\)"):
        ops.matmul(**{**good, "out": torch.empty(5, 3)})
    with pytest.raises(AssertionError, match="only alpha=1.0, beta=0.0"):
        ops.matmul(**{**good, "beta": 1.0})
    with pytest.raises(AssertionError, match="x must be contiguous"):
        ops.matmul(**{**good, "x": torch.randint(-127, 128, (3, 24), dtype=torch.int8)[:, 8:]})


# Weight-only int4: awq_gemm, awq_dequantize ------------------------------------------------------


def assert_int4_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """The Kunlun kernels write fp16 weights only: a float32 result carries fp16's precision
    (2^-11 relative per weight), judged against the largest output like check-kernels' wNa16
    cases (rtol 1e-3); the 16-bit dtypes within their usual tolerance."""
    if got.dtype == torch.float32:
        assert want.dtype == torch.float32 and got.shape == want.shape
        assert float((got - want).abs().max()) <= 1e-5 + 1e-3 * float(want.abs().max())
    else:
        assert_close_to(got, want, want.dtype)


@pytest.mark.parametrize("case", WNA16_CASES.values(), ids=WNA16_CASES.keys())
def test_fp16_small_batches_use_awq_gemm(kunlun, case):
    shape, channels, groups, options = case
    args = wna16_inputs(shape, channels, groups, torch.float16, **options)
    got = kunlun.wna16_gemm(*args)
    assert got.dtype == torch.float16 and got.is_contiguous()
    assert got.shape == (*shape[:-1], channels)
    assert_close_to(got, reference.wna16_gemm(*args), torch.float16)
    assert standin_calls() == {"awq_gemm": 1}


def test_fp16_from_256_rows_dequantizes_then_multiplies(kunlun):
    args = wna16_inputs((256, 96), 40, 3, torch.float16, ordered=True)
    got = kunlun.wna16_gemm(*args)
    assert_close_to(got, reference.wna16_gemm(*args), torch.float16)
    assert standin_calls() == {"awq_dequantize": 1}
    kunlun.wna16_gemm(*wna16_inputs((255, 96), 40, 3, torch.float16))
    assert standin_calls() == {"awq_dequantize": 1, "awq_gemm": 1}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", WNA16_CASES.values(), ids=WNA16_CASES.keys())
def test_other_dtypes_dequantize_to_fp16_then_multiply(kunlun, dtype, case):
    shape, channels, groups, options = case
    args = wna16_inputs(shape, channels, groups, dtype, **options)
    got = kunlun.wna16_gemm(*args)
    assert got.dtype == dtype and got.is_contiguous() and got.shape == (*shape[:-1], channels)
    assert_int4_close(got, reference.wna16_gemm(*args))
    assert standin_calls() == {"awq_dequantize": 1}


def test_awq_gemm_gets_the_recorded_arguments(kunlun, monkeypatch):
    """Keywords; the packed tensors unchanged with align_type 0 (the layout is the normal
    alignment); group_size K / G; x as contiguous rows; out fp16, preallocated; x permuted by
    input_order before the kernel and the bias added after it."""
    seen = {}
    awq_gemm = quant_kunlun.library().awq_gemm

    def spy(**kwargs):
        seen.update(kwargs)
        return awq_gemm(**kwargs)

    monkeypatch.setattr(quant_kunlun.library(), "awq_gemm", spy)
    x, w_packed, scales, zeros, order, bias = wna16_inputs((2, 3, 96), 40, 3, torch.float16,
                                                           ordered=True)  # fmt: skip
    out = kunlun.wna16_gemm(x, w_packed, scales, zeros, order, bias)
    assert (seen["align_type"], seen["group_size"]) == (0, 32)
    assert seen["w"] is w_packed and seen["scale"] is scales and seen["zeros"] is zeros
    assert seen["x"].shape == (6, 96) and seen["x"].is_contiguous()
    assert torch.equal(seen["x"], x[..., order].reshape(6, 96))
    assert seen["out"].dtype == torch.float16 and seen["out"].shape == (6, 40)
    assert torch.equal(out, (seen["out"] + bias).view(2, 3, 40))


def test_awq_dequantize_gets_the_recorded_arguments(kunlun, monkeypatch):
    seen = {}
    awq_dequantize = quant_kunlun.library().awq_dequantize

    def spy(**kwargs):
        seen.update(kwargs)
        return awq_dequantize(**kwargs)

    monkeypatch.setattr(quant_kunlun.library(), "awq_dequantize", spy)
    w_packed, scales, zeros = int4_operands(128, 24, 8, torch.bfloat16, strided=True)
    kunlun.wna16_dequant(w_packed, scales, zeros)
    assert (seen["quant_type"], seen["align_type"], seen["group_m"]) == (0, 0, 16)
    for name, given in (("qweight", w_packed), ("scales", scales), ("zeros", zeros)):
        assert seen[name].is_contiguous() and torch.equal(seen[name], given)
    assert seen["weight"].dtype == torch.float16 and seen["weight"].shape == (128, 24)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequant_uses_awq_dequantize(kunlun, dtype):
    w_packed, scales, zeros = int4_operands(96, 40, 3, dtype, zero_points="extremes")
    got = kunlun.wna16_dequant(w_packed, scales, zeros)
    assert got.dtype == dtype and got.shape == (96, 40) and got.is_contiguous()
    want = reference.wna16_dequant(w_packed, scales, zeros)
    if dtype == torch.float16:  # the kernel's own dtype: the same single rounding
        assert torch.equal(got, want)
    assert_int4_close(got, want)
    assert standin_calls() == {"awq_dequantize": 1}


def test_int4_zero_tokens_call_no_kernel(kunlun):
    out = kunlun.wna16_gemm(*wna16_inputs((0, 64), 16, 2, torch.float16))
    assert out.shape == (0, 16) and out.dtype == torch.float16
    assert standin_calls() == {}


def test_int4_refuses_k_not_a_multiple_of_the_groups(kunlun):
    w_packed, scales, zeros = int4_operands(100, 16, 1, torch.float16)
    x = torch.randn(2, 100).half()
    with pytest.raises(ValueError, match="is not a multiple of the number of groups"):
        kunlun.wna16_gemm(x, w_packed, scales.expand(3, 16), zeros.expand(3, 2), None, None)
    assert standin_calls() == {}


# Weight-only int8 (W8A16): the reference on the XPU -----------------------------------------------


def test_w8a16_is_the_reference_function():
    assert quant_kunlun.w8a16_gemm is reference.w8a16_gemm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", W8A16_CASES.values(), ids=W8A16_CASES.keys())
def test_w8a16_runs_the_reference_and_no_kunlun_kernel(kunlun, dtype, case):
    shape, channels, groups, options = case
    args = w8a16_inputs(shape, channels, groups, dtype, **options)
    got = kunlun.w8a16_gemm(*args)
    assert got.dtype == dtype and got.is_contiguous() and got.shape == (*shape[:-1], channels)
    assert torch.equal(got, reference.w8a16_gemm(*args))
    assert standin_calls() == {}


def test_w8a16_zero_tokens_and_refusals_call_no_kernel(kunlun):
    out = kunlun.w8a16_gemm(*w8a16_inputs((0, 64), 16, 2, torch.float16, ordered=True))
    assert out.shape == (0, 16) and out.dtype == torch.float16
    w_q, scales, zeros = int8_operands(100, 16, 1, torch.float16)
    x = torch.randn(2, 100).half()
    with pytest.raises(ValueError, match="is not a multiple of the number of groups"):
        kunlun.w8a16_gemm(x, w_q, scales.expand(3, 16), zeros.expand(3, 16), None, None)
    with pytest.raises(ValueError, match="must be uint8"):
        kunlun.w8a16_gemm(x, w_q.to(torch.int8), scales, zeros, None, None)
    assert standin_calls() == {}


# The stand-in's int4 contract checks -------------------------------------------------------------


def _awq_gemm_arguments() -> dict:
    w_packed, scales, zeros = int4_operands(64, 16, 2, torch.float16)
    return dict(x=torch.randn(3, 64).half(), w=w_packed, scale=scales, zeros=zeros,
                out=torch.empty(3, 16, dtype=torch.float16), align_type=0,
                group_size=32)  # fmt: skip


def test_standin_awq_decodes_the_recorded_nibble_order(use_standin):
    """Channel j = j, zero points 0, scales 1: the weight is each row's channel numbers."""
    ops = use_standin()
    q = torch.arange(16).remainder(8).expand(2, 16)  # two words per row, channels 0..7 twice
    weight = torch.empty(2, 16, dtype=torch.float16)
    ops.awq_dequantize(qweight=plain_pack(q), scales=torch.ones(1, 16).half(),
                       zeros=plain_pack(torch.zeros(1, 16)), weight=weight, group_m=2,
                       quant_type=0, align_type=0)  # fmt: skip
    assert torch.equal(weight, q.half())


def test_standin_awq_gemm_checks_its_contract(use_standin):
    ops = use_standin()
    good = _awq_gemm_arguments()
    ops.awq_gemm(**good)
    want = good["x"].float() @ plain_dequant(good["w"], good["scale"], good["zeros"]).float()
    assert torch.equal(good["out"], want.half())
    with pytest.raises(AssertionError, match="recorded form"):
        ops.awq_gemm(*good.values())
    with pytest.raises(AssertionError, match="out must be torch.float16"):
        ops.awq_gemm(**{**good, "out": torch.empty(3, 16, dtype=torch.bfloat16)})
    with pytest.raises(AssertionError, match="only align_type=0"):
        ops.awq_gemm(**{**good, "align_type": 1})
    with pytest.raises(AssertionError, match="group size must be K / #groups = 64 / 2"):
        ops.awq_gemm(**{**good, "group_size": 16})
    with pytest.raises(AssertionError, match="qweight must be int32"):
        ops.awq_gemm(**{**good, "w": good["w"].long()})
    with pytest.raises(AssertionError, match="x must be contiguous"):
        ops.awq_gemm(**{**good, "x": torch.randn(3, 72).half()[:, 8:]})
    with pytest.raises(AssertionError, match="zeros must be \\[2, 2\\]"):
        ops.awq_gemm(**{**good, "zeros": good["zeros"][:1]})
    with pytest.raises(AssertionError, match="out must be preallocated as \\(3, 16\\)"):
        ops.awq_gemm(**{**good, "out": torch.empty(3, 8, dtype=torch.float16)})


def test_standin_awq_dequantize_checks_its_contract(use_standin):
    ops = use_standin()
    w_packed, scales, zeros = int4_operands(64, 16, 2, torch.bfloat16)
    good = dict(qweight=w_packed, scales=scales, zeros=zeros,
                weight=torch.empty(64, 16, dtype=torch.float16), group_m=32, quant_type=0,
                align_type=0)  # fmt: skip
    ops.awq_dequantize(**good)
    assert torch.equal(good["weight"], plain_dequant(w_packed, scales, zeros).half())
    with pytest.raises(AssertionError, match="weight must be torch.float16"):
        ops.awq_dequantize(**{**good, "weight": torch.empty(64, 16)})
    with pytest.raises(AssertionError, match="only quant_type=0"):
        ops.awq_dequantize(**{**good, "quant_type": 1})
    with pytest.raises(AssertionError, match="align_type must be 0 \\(normal\\) or 1"):
        ops.awq_dequantize(**{**good, "align_type": 2})
    with pytest.raises(AssertionError, match="qweight must be contiguous"):
        ops.awq_dequantize(**{**good, "qweight": int4_operands(64, 16, 2, torch.bfloat16,
                                                               strided=True)[0]})  # fmt: skip
