"""The quantization family's emulated fast paths (vllm_kunlun/ops/quant/compiled.py): the W8A8
GEMM on torch._int_mm gives bitwise the reference's result (both accumulate exactly and share
the float32 epilogue); other devices and a torch without _int_mm run the reference. The int4
(wNa16) dequantization from bytes gives bitwise the reference's weights and GEMM results; other
devices and a big-endian host run the reference. The int8 weight-only GEMM (W8A16) has no fast
path: the provider runs the reference."""

import pytest
import torch

from tests.ops.helpers import DTYPES
from tests.ops.quant.shared import MM_CASES, WNA16_CASES, int4_operands, mm_inputs, wna16_inputs
from vllm_kunlun.ops.provider import Provider
from vllm_kunlun.ops.quant import compiled, reference

pytestmark = pytest.mark.usefixtures("one_thread")
needs_int_mm = pytest.mark.skipif(not hasattr(torch, "_int_mm"), reason="torch without _int_mm")


@needs_int_mm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MM_CASES.values(), ids=MM_CASES.keys())
def test_bitwise_the_reference(dtype, case):
    rows, depth, channels, options = case
    args = mm_inputs(rows, depth, channels, dtype, **options)
    got = compiled.int8_scaled_mm(*args)
    assert got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, reference.int8_scaled_mm(*args))


@needs_int_mm
@pytest.mark.parametrize("zero_point", [None, -128, 77])
def test_bitwise_the_reference_at_large_k(zero_point):
    args = mm_inputs(3, 8192, 6, torch.float32, zero_point=zero_point)
    assert torch.equal(compiled.int8_scaled_mm(*args), reference.int8_scaled_mm(*args))


@needs_int_mm
def test_int8_on_the_host_takes_int_mm(monkeypatch):
    """The comparisons above could pass on the fallback alone."""
    monkeypatch.setattr(reference, "int8_accumulate", lambda *a: 1 / 0)
    args = mm_inputs(4, 64, 8, torch.bfloat16, zero_point=3)
    compiled.int8_scaled_mm(*args)  # no ZeroDivisionError: _int_mm did the sum
    monkeypatch.delattr(torch, "_int_mm")
    assert not compiled.takes(args[0], args[2])
    with pytest.raises(ZeroDivisionError):
        compiled.int8_scaled_mm(*args)


@needs_int_mm
def test_other_devices_run_the_reference():
    x_q, w_q = torch.empty(2, 8, dtype=torch.int8), torch.empty(3, 8, dtype=torch.int8)
    assert compiled.takes(x_q, w_q)
    assert not compiled.takes(x_q.to("meta"), w_q.to("meta"))


@needs_int_mm
def test_the_provider_runs_the_fast_path():
    kernels = Provider("compiled")  # sources are resolved without building anything
    assert kernels.int8_scaled_mm is compiled.int8_scaled_mm
    assert kernels.sources["int8_scaled_mm"] == "quant.compiled"
    assert kernels.sources["int8_quant_per_token"] == "quant.reference"
    assert kernels.sources["int8_quant_static"] == "quant.reference"


# Weight-only int4 (wNa16) ----------------------------------------------------------------------


def test_the_provider_runs_the_int4_fast_path():
    kernels = Provider("compiled")
    assert kernels.wna16_gemm is compiled.wna16_gemm
    assert kernels.wna16_dequant is compiled.wna16_dequant


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", WNA16_CASES.values(), ids=WNA16_CASES.keys())
def test_wna16_bitwise_the_reference(dtype, case):
    shape, channels, groups, options = case
    args = wna16_inputs(shape, channels, groups, dtype, **options)
    got = compiled.wna16_gemm(*args)
    assert got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, reference.wna16_gemm(*args))
    operands = args[1:4]
    assert torch.equal(compiled.wna16_dequant(*operands), reference.wna16_dequant(*operands))


@pytest.mark.parametrize("scales_dtype", DTYPES)
@pytest.mark.parametrize("x_dtype", DTYPES)
def test_wna16_bitwise_the_reference_with_other_scale_dtypes(x_dtype, scales_dtype):
    x, w_packed, scales, zeros, _, bias = wna16_inputs((8, 256), 48, 2, x_dtype)
    args = (x, w_packed, scales.to(scales_dtype), zeros, None, bias)
    assert torch.equal(compiled.wna16_gemm(*args), reference.wna16_gemm(*args))
    assert torch.equal(compiled.wna16_dequant(*args[1:4]), reference.wna16_dequant(*args[1:4]))


def test_wna16_on_the_host_unpacks_bytes(monkeypatch):
    """The comparisons above could pass on the fallback alone."""
    monkeypatch.setattr(reference, "unpack_int4", lambda *a: 1 / 0)
    args = wna16_inputs((2, 64), 16, 2, torch.bfloat16)
    compiled.wna16_gemm(*args)  # no ZeroDivisionError: the bytes were unpacked
    compiled.wna16_dequant(*args[1:4])
    monkeypatch.setattr(compiled.sys, "byteorder", "big")
    assert not compiled.takes_int4(args[1])
    with pytest.raises(ZeroDivisionError):
        compiled.wna16_gemm(*args)


def test_wna16_other_devices_run_the_reference():
    w_packed, scales, zeros = int4_operands(64, 16, 2, torch.float16)
    assert compiled.takes_int4(w_packed)
    assert not compiled.takes_int4(w_packed.to("meta"))
    got = compiled.wna16_dequant(w_packed.to("meta"), scales.to("meta"), zeros.to("meta"))
    assert got.device.type == "meta" and got.shape == (64, 16)


def test_w8a16_has_no_fast_path_and_runs_the_reference():
    kernels = Provider("compiled")
    assert kernels.w8a16_gemm is reference.w8a16_gemm
    assert kernels.sources["w8a16_gemm"] == "quant.reference"
    assert not hasattr(compiled, "w8a16_gemm")


def test_wna16_refuses_k_not_a_multiple_of_the_groups():
    w_packed, scales, zeros = int4_operands(100, 16, 1, torch.float16)
    with pytest.raises(ValueError, match="is not a multiple of the number of groups"):
        compiled.wna16_dequant(w_packed, scales.expand(3, 16), zeros.expand(3, 2))
