"""The quantization family's emulated fast path (vllm_kunlun/ops/quant/compiled.py): the W8A8
GEMM on torch._int_mm gives bitwise the reference's result (both accumulate exactly and share
the float32 epilogue); other devices and a torch without _int_mm run the reference."""

import pytest
import torch

from tests.ops.helpers import DTYPES
from tests.ops.quant.shared import MM_CASES, mm_inputs
from vllm_kunlun.ops.provider import Provider
from vllm_kunlun.ops.quant import compiled, reference

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not hasattr(torch, "_int_mm"), reason="torch without _int_mm"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MM_CASES.values(), ids=MM_CASES.keys())
def test_bitwise_the_reference(dtype, case):
    rows, depth, channels, options = case
    args = mm_inputs(rows, depth, channels, dtype, **options)
    got = compiled.int8_scaled_mm(*args)
    assert got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, reference.int8_scaled_mm(*args))


@pytest.mark.parametrize("zero_point", [None, -128, 77])
def test_bitwise_the_reference_at_large_k(zero_point):
    args = mm_inputs(3, 8192, 6, torch.float32, zero_point=zero_point)
    assert torch.equal(compiled.int8_scaled_mm(*args), reference.int8_scaled_mm(*args))


def test_int8_on_the_host_takes_int_mm(monkeypatch):
    """The comparisons above could pass on the fallback alone."""
    monkeypatch.setattr(reference, "int8_accumulate", lambda *a: 1 / 0)
    args = mm_inputs(4, 64, 8, torch.bfloat16, zero_point=3)
    compiled.int8_scaled_mm(*args)  # no ZeroDivisionError: _int_mm did the sum
    monkeypatch.delattr(torch, "_int_mm")
    assert not compiled.takes(args[0], args[2])
    with pytest.raises(ZeroDivisionError):
        compiled.int8_scaled_mm(*args)


def test_other_devices_run_the_reference():
    x_q, w_q = torch.empty(2, 8, dtype=torch.int8), torch.empty(3, 8, dtype=torch.int8)
    assert compiled.takes(x_q, w_q)
    assert not compiled.takes(x_q.to("meta"), w_q.to("meta"))


def test_the_provider_runs_the_fast_path():
    kernels = Provider("compiled")  # sources are resolved without building anything
    assert kernels.int8_scaled_mm is compiled.int8_scaled_mm
    assert kernels.sources["int8_scaled_mm"] == "quant.compiled"
    assert kernels.sources["int8_quant_per_token"] == "quant.reference"
    assert kernels.sources["int8_quant_static"] == "quant.reference"
