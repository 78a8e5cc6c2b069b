"""The MoE family's W8A8 experts reference (vllm_kunlun/ops/moe/reference.py: moe_experts_w8a8)
against a plain per-token, per-slot float64 formula (tests/ops/moe/shared.py), across
fp32/bf16/fp16, one token, idle experts, an expert map with remote experts, a token of zeros and
router weights on the input; against the float experts on the dequantized weights; the custom
op's fake implementation; and the family's one host sync, no more."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.library import opcheck

from tests.ops.helpers import DTYPES
from tests.ops.moe.shared import (
    W8A8_SHAPES,
    ExpertsShape,
    assert_w8a8_within,
    experts_w8a8_inputs,
    plain_moe_experts_w8a8,
)
from vllm_kunlun.ops.check.syncs import HostSyncCounter
from vllm_kunlun.ops.moe import reference

pytestmark = pytest.mark.usefixtures("one_thread")

ZEROS = next(s for s in W8A8_SHAPES if s.zero_row is not None)
EXPERT_MAP = next(s for s in W8A8_SHAPES if s.local_ids is not None)
ON_INPUT = next(s for s in W8A8_SHAPES if s.on_input)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", W8A8_SHAPES, ids=str)
def test_moe_experts_w8a8(dtype, shape):
    args = experts_w8a8_inputs(shape, dtype)
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    got = reference.moe_experts_w8a8(*args)
    assert got.dtype == dtype and got.shape == args[0].shape and got.is_contiguous()
    assert_w8a8_within(got, *plain_moe_experts_w8a8(*args), dtype)
    for arg, kept in zip(args, before, strict=True):
        if isinstance(arg, torch.Tensor):
            assert torch.equal(arg, kept), "an input was modified"


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_token_of_zeros_gives_zeros_not_nans(dtype):
    args = experts_w8a8_inputs(ZEROS, dtype)
    out = reference.moe_experts_w8a8(*args)
    assert bool(out.isfinite().all())
    assert torch.equal(out[ZEROS.zero_row], torch.zeros_like(out[ZEROS.zero_row]))
    assert bool((out.abs().sum(-1) > 0).sum() == ZEROS.tokens - 1)


def test_remote_experts_contribute_nothing():
    shape = ExpertsShape("all remote", 4, 2, 2, 32, 16, local_ids=(0, 1))
    x, w13, a13, w2, a2, weights, _, _, act, on_input = experts_w8a8_inputs(shape, torch.float32)
    expert_map = torch.tensor([0, 1, -1, -1], dtype=torch.int32)
    remote = torch.tensor([[2, 3]] * 4, dtype=torch.int32)  # experts 2 and 3 live elsewhere
    out = reference.moe_experts_w8a8(x, w13, a13, w2, a2, weights, remote, expert_map, act,
                                     on_input)  # fmt: skip
    assert torch.equal(out, torch.zeros_like(out))
    mixed = torch.tensor([[0, 2], [3, 1], [1, 0], [2, 3]], dtype=torch.int32)
    args = (x, w13, a13, w2, a2, weights, mixed, expert_map, act, on_input)
    out = reference.moe_experts_w8a8(*args)
    assert_w8a8_within(out, *plain_moe_experts_w8a8(*args), torch.float32)
    assert torch.equal(out[3], torch.zeros_like(out[3]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_router_weight_on_input_scales_the_row_before_the_mlp(dtype):
    """x * w, rounded to x's dtype, goes through the MLP (a nonlinear one: not w times the
    unweighted output); weights that are not 1 (top-1 weights renormalized would all be 1)."""
    x, w13, a13, w2, a2, _, ids, expert_map, act, _ = experts_w8a8_inputs(ON_INPUT, dtype)
    weights = torch.rand(ids.shape) + 0.1
    args = (x, w13, a13, w2, a2, weights, ids, expert_map, act, True)
    on_input = reference.moe_experts_w8a8(*args)
    assert_w8a8_within(on_input, *plain_moe_experts_w8a8(*args), dtype)
    after = reference.moe_experts_w8a8(*args[:9], False)
    assert_w8a8_within(after, *plain_moe_experts_w8a8(*args[:9], False), dtype)
    assert (on_input.double() - after.double()).abs().max() > 0.1 * after.abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
def test_close_to_the_float_experts_on_the_dequantized_weights(dtype):
    """The absmax convention: w = w_q * absmax / 127 per output channel. What is left is the
    activations' int8 quantization error (about 1 % here), not a factor of 127."""
    shape = W8A8_SHAPES[5]
    x, w13, a13, w2, a2, *routing = experts_w8a8_inputs(shape, dtype)
    w13_float = (w13.double() * a13.double()[..., None] / 127).to(dtype)
    w2_float = (w2.double() * a2.double()[..., None] / 127).to(dtype)
    got = reference.moe_experts_w8a8(x, w13, a13, w2, a2, *routing).double()
    want = reference.moe_experts(x.double(), w13_float.double(), w2_float.double(),
                                 *routing)  # fmt: skip
    error = (got - want).abs().max() / want.abs().max()
    assert 0 < error < 0.05


def test_float64_runs_as_check_kernels_oracle():
    """The oracle widens x and the absmaxes to float64; the int8 weights stay int8."""
    args = experts_w8a8_inputs(W8A8_SHAPES[6], torch.float32)
    wide = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)  # fmt: skip
    got = reference.moe_experts_w8a8(*wide)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.float(), reference.moe_experts_w8a8(*args),
                               rtol=1e-2, atol=1e-4)  # fmt: skip


def test_zero_tokens():
    x, w13, a13, w2, a2, weights, ids, *rest = experts_w8a8_inputs(W8A8_SHAPES[1],
                                                                   torch.bfloat16)  # fmt: skip
    out = reference.moe_experts_w8a8(x[:0], w13, a13, w2, a2, weights[:0], ids[:0], *rest)
    assert out.shape == (0, x.shape[1]) and out.dtype == torch.bfloat16


def test_moe_experts_w8a8_refuses_bad_arguments():
    args = list(experts_w8a8_inputs(W8A8_SHAPES[0], torch.float32))
    with pytest.raises(ValueError, match="activation must be one of silu, gelu, gelu_tanh"):
        reference.moe_experts_w8a8(*args[:8], "relu2", False)
    with pytest.raises(ValueError, match="needs top_k == 1, not 2"):
        reference.moe_experts_w8a8(*args[:8], "silu", True)


# Host syncs --------------------------------------------------------------------------------------


def test_one_host_sync_the_family_budget(monkeypatch):
    """Nothing the aten-level counter sees, and one `.tolist()` (grouped_experts' token counts,
    which it does not see): the quantization and the int8 GEMMs add none."""
    lists = []
    tolist = torch.Tensor.tolist

    def counted(self):
        lists.append(tuple(self.shape))
        return tolist(self)

    args = experts_w8a8_inputs(EXPERT_MAP, torch.bfloat16)
    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    with HostSyncCounter() as counter:
        reference.moe_experts_w8a8(*args)
    monkeypatch.undo()
    assert counter.total == 0, dict(counter.by_op)
    assert lists == [(len(EXPERT_MAP.local_ids) + 1,)]


# The custom op -----------------------------------------------------------------------------------


def test_fake_implementation_gives_a_contiguous_tensor_like_x():
    args = experts_w8a8_inputs(W8A8_SHAPES[4], torch.bfloat16)  # strided hidden states
    assert not args[0].is_contiguous()
    with FakeTensorMode() as mode:
        fake = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        out = torch.ops.kunlun.moe_experts_w8a8(*fake)
    assert out.shape == args[0].shape and out.dtype == torch.bfloat16 and out.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_opcheck_expert_map_strided_input_and_weight_on_input(reference_ops, dtype):
    for shape in (EXPERT_MAP, W8A8_SHAPES[4], ON_INPUT):
        opcheck(torch.ops.kunlun.moe_experts_w8a8.default, experts_w8a8_inputs(shape, dtype))


def test_the_custom_op_runs_the_reference(reference_ops):
    args = experts_w8a8_inputs(EXPERT_MAP, torch.bfloat16)
    assert torch.equal(torch.ops.kunlun.moe_experts_w8a8(*args),
                       reference.moe_experts_w8a8(*args))  # fmt: skip
