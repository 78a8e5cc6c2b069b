"""The activation family's Kunlun binding (vllm_kunlun/ops/activation/kunlun.py) against the
recorded kunlun_ops API (KUNLUN.md §2b), through the stand-in library (tests/standin)."""

import pytest
import torch

from tests.ops.helpers import DTYPES, standin_calls
from vllm_kunlun.ops.activation import reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 40), (2, 3, 40)])
@pytest.mark.parametrize("contiguous", [True, False])
def test_silu_and_mul(kunlun, dtype, shape, contiguous):
    x = torch.randn(*shape).to(dtype)
    if not contiguous:
        x = torch.cat([x, x], dim=-1)[..., 7 : 7 + shape[-1]]
    got = kunlun.silu_and_mul(x)
    torch.testing.assert_close(got, reference.silu_and_mul(x))
    assert standin_calls() == {"swiglu": 1}


def test_gelu_and_mul_has_no_recorded_kernel_and_runs_the_reference(kunlun):
    """KUNLUN.md records no reliable fused GELU-and-mul kernel: the binding names the reference."""
    assert kunlun.gelu_and_mul is reference.gelu_and_mul
    assert kunlun.sources["gelu_and_mul"] == "activation.reference"
    x = torch.randn(3, 40)
    torch.testing.assert_close(kunlun.gelu_and_mul(x, "tanh"), reference.gelu_and_mul(x, "tanh"))
    assert standin_calls() == {}
