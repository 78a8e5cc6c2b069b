"""The MoE family's weight-only int4 experts reference (vllm_kunlun/ops/moe/reference.py:
moe_experts_wna16) against a plain per-token, per-slot float64 formula (tests/ops/moe/shared.py,
on the quant tests' plain int4 unpacking), across fp32/bf16/fp16, one token, idle experts,
top_k = experts, an expert map with remote experts, router weights on the input, sizes that are
not powers of two, 1 to 16 groups per expert, strided hidden states and weights, and a token of
zeros; against the float experts on the dequantized weights; its refusals; the custom op's fake
implementation; and the family's one host sync, no more."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.library import opcheck

from tests.ops.helpers import DTYPES
from tests.ops.moe.shared import (
    WNA16_SHAPES,
    Int4ExpertsShape,
    assert_within,
    experts_wna16_inputs,
    int4_expert_weights,
    plain_dequantized_experts,
    plain_moe_experts_wna16,
)
from vllm_kunlun.ops.check.syncs import HostSyncCounter
from vllm_kunlun.ops.moe import reference

pytestmark = pytest.mark.usefixtures("one_thread")

ZEROS = next(s for s in WNA16_SHAPES if s.zero_row is not None)
EXPERT_MAP = next(s for s in WNA16_SHAPES if s.local_ids is not None)
ON_INPUT = next(s for s in WNA16_SHAPES if s.on_input)
STRIDED = next(s for s in WNA16_SHAPES if s.strided)
ODD = next(s for s in WNA16_SHAPES if s.hidden == 72)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", WNA16_SHAPES, ids=str)
def test_moe_experts_wna16(dtype, shape):
    args = experts_wna16_inputs(shape, dtype)
    assert args[0].is_contiguous() != shape.strided
    assert args[1].is_contiguous() != shape.strided_weights
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    got = reference.moe_experts_wna16(*args)
    assert got.dtype == dtype and got.shape == args[0].shape and got.is_contiguous()
    assert_within(got, plain_moe_experts_wna16(*args), dtype)
    for arg, kept in zip(args, before, strict=True):
        if isinstance(arg, torch.Tensor):
            assert torch.equal(arg, kept), "an input was modified"


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_token_of_zeros_gives_zeros_not_nans(dtype):
    args = experts_wna16_inputs(ZEROS, dtype)
    out = reference.moe_experts_wna16(*args)
    assert bool(out.isfinite().all())
    assert torch.equal(out[ZEROS.zero_row], torch.zeros_like(out[ZEROS.zero_row]))
    assert bool((out.abs().sum(-1) > 0).sum() == ZEROS.tokens - 1)


def test_remote_experts_contribute_nothing():
    shape = Int4ExpertsShape("all remote", 4, 2, 2, 32, 16, local_ids=(0, 1), groups=(2, 2))
    x, *weights, topk_weights, _, _, act, on_input = experts_wna16_inputs(shape, torch.float32)
    expert_map = torch.tensor([0, 1, -1, -1], dtype=torch.int32)
    remote = torch.tensor([[2, 3]] * 4, dtype=torch.int32)  # experts 2 and 3 live elsewhere
    out = reference.moe_experts_wna16(x, *weights, topk_weights, remote, expert_map, act,
                                      on_input)  # fmt: skip
    assert torch.equal(out, torch.zeros_like(out))
    mixed = torch.tensor([[0, 2], [3, 1], [1, 0], [2, 3]], dtype=torch.int32)
    args = (x, *weights, topk_weights, mixed, expert_map, act, on_input)
    out = reference.moe_experts_wna16(*args)
    assert_within(out, plain_moe_experts_wna16(*args), torch.float32)
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    assert bool((out[:3].abs().sum(-1) > 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_router_weight_on_input_scales_the_row_before_the_mlp(dtype):
    """x * w, rounded to x's dtype, goes through the MLP (a nonlinear one: not w times the
    unweighted output); weights that are not 1 (top-1 weights renormalized would all be 1)."""
    x, *weights, _, ids, expert_map, act, _ = experts_wna16_inputs(ON_INPUT, dtype)
    topk_weights = torch.rand(ids.shape) + 0.1
    args = (x, *weights, topk_weights, ids, expert_map, act, True)
    on_input = reference.moe_experts_wna16(*args)
    assert_within(on_input, plain_moe_experts_wna16(*args), dtype)
    after = reference.moe_experts_wna16(*args[:11], False)
    assert_within(after, plain_moe_experts_wna16(*args[:11], False), dtype)
    assert (on_input.double() - after.double()).abs().max() > 0.1 * after.abs().max()


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
def test_close_to_the_float_experts_on_the_dequantized_weights(dtype):
    """The layout: w13 [E, H, 2I / 8] and w2 [E, I, H / 8], input dimension first, are the float
    experts' w13 [E, 2I, H] and w2 [E, H, I] transposed, dequantized per group."""
    x, w13p, w13s, w13z, w2p, w2s, w2z, *routing = experts_wna16_inputs(ODD, dtype)
    w13 = plain_dequantized_experts(w13p, w13s, w13z, dtype).transpose(1, 2).to(dtype)
    w2 = plain_dequantized_experts(w2p, w2s, w2z, dtype).transpose(1, 2).to(dtype)
    got = reference.moe_experts_wna16(x, w13p, w13s, w13z, w2p, w2s, w2z, *routing)
    want = reference.moe_experts(x, w13, w2, *routing)
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    else:
        assert_within(got, want.double(), dtype)


@pytest.mark.parametrize(
    ("dtype", "scales_dtype"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.bfloat16),
    ],
)
def test_scales_dtype_may_differ_from_x(dtype, scales_dtype):
    """Scales in any float dtype: W = (q - z) * s in float32 (at least), rounded once to x's."""
    args = list(experts_wna16_inputs(ODD, dtype))
    args[2], args[5] = args[2].to(scales_dtype), args[5].to(scales_dtype)
    got = reference.moe_experts_wna16(*args)
    assert got.dtype == dtype and got.shape == args[0].shape
    assert_within(got, plain_moe_experts_wna16(*args), dtype)


def test_float64_runs_as_check_kernels_oracle():
    """The oracle widens x, the scales and the router weights to float64; the packed weights and
    zero points stay int32."""
    args = experts_wna16_inputs(EXPERT_MAP, torch.float32)
    wide = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)  # fmt: skip
    got = reference.moe_experts_wna16(*wide)
    assert got.dtype == torch.float64 and got.shape == args[0].shape
    assert_within(got, plain_moe_experts_wna16(*wide), torch.float32)
    torch.testing.assert_close(got.float(), reference.moe_experts_wna16(*args),
                               rtol=1e-4, atol=1e-5)  # fmt: skip


def test_zero_tokens():
    x, *weights, topk_weights, ids, expert_map, act, flag = experts_wna16_inputs(
        WNA16_SHAPES[1], torch.bfloat16
    )
    out = reference.moe_experts_wna16(x[:0], *weights, topk_weights[:0], ids[:0], expert_map,
                                      act, flag)  # fmt: skip
    assert out.shape == (0, x.shape[1]) and out.dtype == torch.bfloat16


# Refusals --------------------------------------------------------------------------------------


def test_moe_experts_wna16_refuses_bad_arguments():
    args = list(experts_wna16_inputs(WNA16_SHAPES[0], torch.float32))
    with pytest.raises(ValueError, match="activation must be one of silu, gelu, gelu_tanh"):
        reference.moe_experts_wna16(*args[:10], "relu2", False)
    with pytest.raises(ValueError, match="needs top_k == 1, not 2"):
        reference.moe_experts_wna16(*args[:10], "silu", True)


def _mismatched(name: str) -> tuple:
    """The arguments of WNA16_SHAPES[0] (4 experts, H 64, I 32) with one shape wrong."""
    x, w13p, w13s, w13z, w2p, w2s, w2z, *routing = experts_wna16_inputs(WNA16_SHAPES[0],
                                                                        torch.float32)  # fmt: skip
    if name == "H":  # x has 72 features, the weights 64
        x = torch.randn(x.shape[0], 72)
    elif name == "w2 H":  # w2's output channels 72, w13's input 64
        w2p, w2s, w2z = int4_expert_weights(4, 32, 72, 1, torch.float32)
    elif name == "I":  # w2 takes I = 24, w13 makes 2I = 64
        w2p, w2s, w2z = int4_expert_weights(4, 24, 64, 1, torch.float32)
    elif name == "H not a multiple of G13":  # 64 rows in 3 groups
        w13p, w13s, w13z = int4_expert_weights(4, 64, 64, 3, torch.float32)
    elif name == "I not a multiple of G2":  # 32 rows in 5 groups
        w2p, w2s, w2z = int4_expert_weights(4, 32, 64, 5, torch.float32)
    elif name == "E":  # w2 for 3 experts, w13 for 4
        w2p, w2s, w2z = (t[:3] for t in (w2p, w2s, w2z))
    elif name == "zeros":  # w13's zero points for 2 groups, its scales for 1
        w13z = w13z.repeat(1, 2, 1)
    elif name == "words":  # w13's scales for 64 channels, its packed words for 56
        w13p = w13p[..., :7]
    elif name == "2-D":
        w2s = w2s[0]
    return (x, w13p, w13s, w13z, w2p, w2s, w2z, *routing)


MISMATCHES = {
    "H": "x has H = 72 features, but w13_packed is \\[4, 64, 8\\]",
    "w2 H": "x has H = 64 features, .* w2_scales \\[4, 1, 72\\]",
    "I": "w13_scales \\[4, 1, 64\\] \\(\\[E, G13, 2I\\]\\) and w2_packed \\[4, 24, 8\\] .* "
    "disagree on I",
    "H not a multiple of G13": "K = 64 .* is not a multiple of the number of groups G = 3",
    "I not a multiple of G2": "K = 32 .* is not a multiple of the number of groups G = 5",
    "E": "w2_packed must be \\[E = 4, ..\\], got \\[3, 32, 8\\]",
    "zeros": "zeros must be \\[G, N / 8\\] = \\[1, 8\\]",
    "words": "scales have N = 64 columns, but w_packed \\[K, N / 8\\] has 7 words",
    "2-D": "w2_scales must be \\[E = 4, ..\\], got \\[1, 64\\]",
}


@pytest.mark.parametrize("name", MISMATCHES)
def test_moe_experts_wna16_refuses_mismatched_shapes(name):
    with pytest.raises(ValueError, match=MISMATCHES[name]):
        reference.moe_experts_wna16(*_mismatched(name))


# Host syncs --------------------------------------------------------------------------------------


def test_one_host_sync_the_family_budget(monkeypatch):
    """Nothing the aten-level counter sees, and one `.tolist()` (grouped_experts' token counts,
    which it does not see): the shape checks, the int4 unpacking and the GEMMs add none."""
    lists = []
    tolist = torch.Tensor.tolist

    def counted(self):
        lists.append(tuple(self.shape))
        return tolist(self)

    args = experts_wna16_inputs(EXPERT_MAP, torch.bfloat16)
    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    with HostSyncCounter() as counter:
        reference.moe_experts_wna16(*args)
    monkeypatch.undo()
    assert counter.total == 0, dict(counter.by_op)
    assert lists == [(len(EXPERT_MAP.local_ids) + 1,)]


# The custom op -----------------------------------------------------------------------------------


def test_fake_implementation_gives_a_contiguous_tensor_like_x():
    args = experts_wna16_inputs(STRIDED, torch.bfloat16)  # strided hidden states
    assert not args[0].is_contiguous()
    with FakeTensorMode() as mode:
        fake = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        out = torch.ops.kunlun.moe_experts_wna16(*fake)
    assert out.shape == args[0].shape and out.dtype == torch.bfloat16 and out.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_opcheck_expert_map_strided_input_and_weight_on_input(reference_ops, dtype):
    for shape in (EXPERT_MAP, STRIDED, ON_INPUT):
        opcheck(torch.ops.kunlun.moe_experts_wna16.default, experts_wna16_inputs(shape, dtype))


def test_the_custom_op_runs_the_reference(reference_ops):
    args = experts_wna16_inputs(EXPERT_MAP, torch.bfloat16)
    assert torch.equal(torch.ops.kunlun.moe_experts_wna16(*args),
                       reference.moe_experts_wna16(*args))  # fmt: skip
