"""The quantization family's Kunlun binding (vllm_kunlun/ops/quant/kunlun.py) against the
recorded kunlun_ops API (KUNLUN.md §2g), through the stand-in library (tests/standin): every call
is checked against the recorded contract (keyword forms, int8 operands, float32 absmax and bias,
contiguity, preallocated outputs) and must give the reference kernels' results. This is all the
verification the binding has until it runs on a Kunlun XPU."""

import pytest
import torch

from tests.ops.helpers import DTYPES, standin_calls
from tests.ops.quant.shared import MM_CASES, mm_inputs, ties
from vllm_kunlun.ops.provider import Provider
from vllm_kunlun.ops.quant import kunlun as quant_kunlun
from vllm_kunlun.ops.quant import reference

# Loading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["quant2d", "matmul"])
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


def test_the_quant_ops_are_bound_or_name_the_reference(kunlun):
    assert kunlun.sources["int8_quant_per_token"] == "quant.kunlun"
    assert kunlun.sources["int8_scaled_mm"] == "quant.kunlun"
    # no recorded kunlun_ops kernel (only xspeedgate_ops.static_scaled_int8_quant)
    assert kunlun.sources["int8_quant_static"] == "quant.reference"


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
