"""The MoE family's emulated fast path (vllm_kunlun/ops/moe/compiled.py): bfloat16 experts on
oneDNN-packed weights, against the same plain float64 formula as the reference; other dtypes go
to the reference. Packed weights are made once per weight version and dropped with the weight.
The W8A8 experts on torch._int_mm and the weight-only int4 experts on the byte-wise int4
unpacking are bitwise the reference's."""

import gc

import pytest
import torch

from tests.ops.helpers import DTYPES, compiled_provider
from tests.ops.moe.shared import (
    SHAPES,
    W8A8_SHAPES,
    WNA16_SHAPES,
    assert_within,
    experts_inputs,
    experts_w8a8_inputs,
    experts_wna16_inputs,
    plain_moe_experts,
)
from vllm_kunlun.ops.moe import compiled, reference
from vllm_kunlun.ops.provider import Provider
from vllm_kunlun.ops.quant import compiled as quant_compiled
from vllm_kunlun.ops.quant import reference as quant_reference

pytestmark = pytest.mark.usefixtures("one_thread")
needs_packing = pytest.mark.skipif(
    not compiled.packing_available(), reason="torch without oneDNN bf16"
)
needs_int_mm = pytest.mark.skipif(not hasattr(torch, "_int_mm"), reason="torch without _int_mm")
needs_int4_bytes = pytest.mark.skipif(
    not quant_compiled.takes_int4(torch.zeros(1, 1, dtype=torch.int32)),
    reason="no byte-wise int4 unpacking on this host",
)


@needs_packing
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_moe_experts(dtype, shape):
    args = experts_inputs(shape, dtype)
    got = compiled.moe_experts(*args)
    assert got.dtype == dtype and got.shape == args[0].shape and got.is_contiguous()
    assert_within(got, plain_moe_experts(*args), dtype)


@needs_packing
def test_bfloat16_takes_the_packed_path_and_other_dtypes_the_reference(monkeypatch):
    """The formula tests above could pass on the fallback alone."""
    monkeypatch.setattr(reference, "moe_experts", lambda *a: 1 / 0)
    args = experts_inputs(SHAPES[6], torch.bfloat16)
    assert_within(compiled.moe_experts(*args), plain_moe_experts(*args), torch.bfloat16)
    with pytest.raises(ZeroDivisionError):
        compiled.moe_experts(*experts_inputs(SHAPES[6], torch.float32))


@needs_packing
def test_the_provider_runs_the_fast_path():
    kernels = compiled_provider()
    assert kernels.moe_experts is compiled.moe_experts
    assert kernels.sources["moe_experts"] == "moe.compiled"
    assert kernels.sources["moe_softmax_topk"] == "moe.reference"


@needs_packing
def test_weights_are_packed_once_per_version_and_dropped_with_the_weight():
    x, w13, w2, *rest = experts_inputs(SHAPES[5], torch.bfloat16)
    first = compiled.moe_experts(x, w13, w2, *rest)
    packed = compiled.packed_experts(w13)
    assert compiled.packed_experts(w13) is packed  # cached, not packed again
    assert len(packed) == w13.shape[0]

    w13.mul_(2)  # an in-place update (a weight reload) bumps the version: packed afresh
    assert compiled.packed_experts(w13) is not packed
    again = compiled.moe_experts(x, w13, w2, *rest)
    assert not torch.equal(again, first)
    assert_within(again, plain_moe_experts(x, w13, w2, *rest), torch.bfloat16)

    keys = {w13.data_ptr(), w2.data_ptr()}
    assert keys <= compiled._packed.keys()
    del w13, w2, packed
    gc.collect()
    assert not keys & compiled._packed.keys()


# W8A8 experts --------------------------------------------------------------------------------


@needs_int_mm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", W8A8_SHAPES, ids=str)
def test_moe_experts_w8a8_is_bitwise_the_reference(dtype, shape):
    args = experts_w8a8_inputs(shape, dtype)
    got = compiled.moe_experts_w8a8(*args)
    assert got.dtype == dtype and got.shape == args[0].shape and got.is_contiguous()
    assert torch.equal(got, reference.moe_experts_w8a8(*args))


@needs_int_mm
def test_moe_experts_w8a8_takes_int_mm(monkeypatch):
    """The comparison above could pass on the reference's GEMM alone."""
    args = experts_w8a8_inputs(W8A8_SHAPES[6], torch.bfloat16)
    want = reference.moe_experts_w8a8(*args)
    monkeypatch.setattr(quant_reference, "int8_accumulate", lambda *a: 1 / 0)
    assert torch.equal(compiled.moe_experts_w8a8(*args), want)
    with pytest.raises(ZeroDivisionError):
        reference.moe_experts_w8a8(*args)


def test_moe_experts_w8a8_refuses_what_the_reference_refuses():
    args = list(experts_w8a8_inputs(W8A8_SHAPES[0], torch.float32))
    with pytest.raises(ValueError, match="activation must be one of"):
        compiled.moe_experts_w8a8(*args[:8], "relu2", False)
    with pytest.raises(ValueError, match="needs top_k == 1"):
        compiled.moe_experts_w8a8(*args[:8], "silu", True)


def test_the_provider_runs_the_w8a8_fast_path():
    kernels = Provider("compiled")  # sources are resolved without building anything
    assert kernels.moe_experts_w8a8 is compiled.moe_experts_w8a8
    assert kernels.sources["moe_experts_w8a8"] == "moe.compiled"


# Weight-only int4 (wNa16) experts ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", WNA16_SHAPES, ids=str)
def test_moe_experts_wna16_is_bitwise_the_reference(dtype, shape):
    args = experts_wna16_inputs(shape, dtype)
    got = compiled.moe_experts_wna16(*args)
    assert got.dtype == dtype and got.shape == args[0].shape and got.is_contiguous()
    assert torch.equal(got, reference.moe_experts_wna16(*args))


@pytest.mark.parametrize(
    ("dtype", "scales_dtype"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]
)
def test_moe_experts_wna16_mixed_scales_dtype_is_bitwise_the_reference(dtype, scales_dtype):
    args = list(experts_wna16_inputs(WNA16_SHAPES[5], dtype))
    args[2], args[5] = args[2].to(scales_dtype), args[5].to(scales_dtype)
    got = compiled.moe_experts_wna16(*args)
    assert got.dtype == dtype
    assert torch.equal(got, reference.moe_experts_wna16(*args))


@needs_int4_bytes
def test_moe_experts_wna16_takes_the_byte_wise_unpacking(monkeypatch):
    """The comparison above could pass on the reference's GEMM alone."""
    args = experts_wna16_inputs(WNA16_SHAPES[6], torch.bfloat16)
    want = reference.moe_experts_wna16(*args)
    monkeypatch.setattr(quant_reference, "dequantize_int4", lambda *a: 1 / 0)
    assert torch.equal(compiled.moe_experts_wna16(*args), want)
    with pytest.raises(ZeroDivisionError):
        reference.moe_experts_wna16(*args)


def test_moe_experts_wna16_refuses_what_the_reference_refuses():
    args = list(experts_wna16_inputs(WNA16_SHAPES[0], torch.float32))
    with pytest.raises(ValueError, match="activation must be one of"):
        compiled.moe_experts_wna16(*args[:10], "relu2", False)
    with pytest.raises(ValueError, match="needs top_k == 1"):
        compiled.moe_experts_wna16(*args[:10], "silu", True)
    x, w13p, w13s, w13z, *rest = args
    with pytest.raises(ValueError, match="x has H = 72 features"):
        compiled.moe_experts_wna16(torch.randn(x.shape[0], 72), w13p, w13s, w13z, *rest)
    with pytest.raises(ValueError, match="disagree on I"):
        compiled.moe_experts_wna16(x, w13p, w13s, w13z, args[4][:, :24], *args[5:])
    groups3 = (w13s[:, :1].expand(-1, 3, -1), w13z[:, :1].expand(-1, 3, -1))
    with pytest.raises(ValueError, match="is not a multiple of the number of groups G = 3"):
        compiled.moe_experts_wna16(x, w13p, *groups3, *rest)


def test_the_provider_runs_the_wna16_fast_path():
    kernels = Provider("compiled")  # sources are resolved without building anything
    assert kernels.moe_experts_wna16 is compiled.moe_experts_wna16
    assert kernels.sources["moe_experts_wna16"] == "moe.compiled"
