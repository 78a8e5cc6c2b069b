"""The MoE family's reference kernels (vllm_kunlun/ops/moe/reference.py) against plain per-token
float64 formulas (tests/ops/moe/shared.py): softmax top-k routing, grouped top-k routing
(DeepSeek-V3 / GLM-4.5, both scorings, with and without the correction bias) and the experts'
gated MLPs, across fp32/bf16/fp16 and awkward shapes."""

import pytest
import torch
from torch.library import opcheck

from tests.ops.helpers import DTYPES
from tests.ops.moe.shared import (
    SHAPES,
    ExpertsShape,
    assert_within,
    distinct_logits,
    experts_inputs,
    plain_grouped_topk,
    plain_moe_experts,
    plain_softmax_topk,
)
from vllm_kunlun.ops.check.syncs import HostSyncCounter
from vllm_kunlun.ops.moe import reference

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_routing(got, want, ids_exact: bool = True) -> None:
    weights, ids = got
    want_weights, want_ids = want
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.is_contiguous() and ids.is_contiguous()
    assert weights.shape == ids.shape == want_ids.shape
    if ids_exact:
        assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights.double(), want_weights, atol=1e-6, rtol=1e-5)


# Softmax top-k -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "experts", "top_k"),
                         [(1, 8, 2), (3, 60, 4), (5, 6, 6), (17, 12, 3), (4, 128, 8)])  # fmt: skip
@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_topk(dtype, tokens, experts, top_k, renormalize):
    logits = distinct_logits(tokens, experts, dtype)
    got = reference.moe_softmax_topk(logits, top_k, renormalize)
    assert_routing(got, plain_softmax_topk(logits, top_k, renormalize))
    if renormalize:
        torch.testing.assert_close(got[0].sum(-1), torch.ones(tokens))


def test_softmax_topk_in_float32_even_for_half_logits():
    """Two bf16 logits 1/64 apart: their softmax weights differ by 1/64 relative, which bf16
    weights could not keep (they would round to the same value)."""
    logits = torch.tensor([[0.0, 1 / 64, -1.0, -2.0]], dtype=torch.bfloat16)
    weights, ids = reference.moe_softmax_topk(logits, 2, False)
    assert ids.tolist() == [[1, 0]]
    assert weights[0, 0] / weights[0, 1] == pytest.approx(torch.tensor(1 / 64).exp().item())


def test_softmax_topk_strided_logits_and_ties():
    logits = torch.randn(5, 20)[:, 3:15]
    assert_routing(reference.moe_softmax_topk(logits, 3, True),
                   plain_softmax_topk(logits, 3, True))  # fmt: skip
    tied = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    _, ids = reference.moe_softmax_topk(tied, 2, False)
    assert ids.tolist() == [[1, 2]]  # ties go to the lower expert id


def test_softmax_topk_refuses_a_bad_top_k():
    with pytest.raises(ValueError, match="top_k=9"):
        reference.moe_softmax_topk(torch.randn(2, 8), 9, True)


# Grouped top-k -------------------------------------------------------------------------------

GROUPED = [
    # tokens, experts, top_k, groups, topk_group, scoring, bias, renormalize, scale
    (1, 64, 8, 8, 4, "sigmoid", True, True, 2.5),
    (33, 256, 8, 8, 4, "sigmoid", True, True, 1.0),
    (9, 48, 6, 6, 3, "sigmoid", False, False, 1.0),
    (5, 60, 6, 10, 3, "softmax", False, True, 16.0),
    (7, 40, 5, 5, 3, "softmax", True, True, 1.0),
    (4, 24, 8, 6, 2, "sigmoid", True, False, 1.0),
    (6, 20, 3, 20, 5, "sigmoid", True, True, 1.0),  # groups of one expert
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GROUPED, ids=lambda c: f"{c[0]}x{c[1]}/{c[3]} {c[5]} b={c[6]}")
def test_grouped_topk(dtype, case):
    tokens, experts, top_k, groups, topk_group, scoring, with_bias, renormalize, scale = case
    logits = distinct_logits(tokens, experts, dtype)
    bias = torch.rand(experts) * 0.1 if with_bias else None
    args = (logits, top_k, renormalize, groups, topk_group, scoring, bias, scale)
    assert_routing(reference.moe_grouped_topk(*args), plain_grouped_topk(*args))


def test_grouped_topk_bias_steers_the_choice_but_not_the_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])
    weights, ids = reference.moe_grouped_topk(logits, 1, False, 1, 1, "sigmoid", bias, 1.0)
    assert ids.tolist() == [[3]]
    assert weights.item() == pytest.approx(torch.sigmoid(torch.tensor(-1.0)).item())


def test_grouped_topk_keeps_only_the_best_groups():
    """Group score: the best member without a bias, the sum of the best two with one."""
    logits = torch.tensor([[3.0, -5.0, 1.0, 1.0]])  # groups {0, 1} and {2, 3}
    _, ids = reference.moe_grouped_topk(logits, 2, True, 2, 1, "sigmoid", None, 1.0)
    assert ids.tolist() == [[0, 1]]  # group 0 has the best expert
    _, ids = reference.moe_grouped_topk(logits, 2, True, 2, 1, "sigmoid", torch.zeros(4), 1.0)
    assert sorted(ids.tolist()[0]) == [2, 3]  # group 1 has the best pair


def test_grouped_topk_refuses_bad_groups_and_scorings():
    logits = torch.randn(2, 12)
    with pytest.raises(ValueError, match="equal groups"):
        reference.moe_grouped_topk(logits, 2, True, 5, 2, "sigmoid", None, 1.0)
    with pytest.raises(ValueError, match="topk_group=4"):
        reference.moe_grouped_topk(logits, 2, True, 3, 4, "sigmoid", None, 1.0)
    with pytest.raises(ValueError, match="top_k=9"):
        reference.moe_grouped_topk(logits, 9, True, 3, 2, "sigmoid", None, 1.0)
    with pytest.raises(ValueError, match="scoring_func"):
        reference.moe_grouped_topk(logits, 2, True, 3, 2, "sqrtsoftplus", None, 1.0)


def test_routing_has_no_host_sync():
    logits = torch.randn(9, 64)
    with HostSyncCounter() as counter:
        reference.moe_softmax_topk(logits, 4, True)
        reference.moe_grouped_topk(logits, 4, True, 8, 2, "sigmoid", torch.rand(64), 2.0)
        reference.moe_grouped_topk(logits, 4, False, 8, 2, "softmax", None, 1.0)
    assert counter.total == 0


# Experts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_moe_experts(dtype, shape):
    args = experts_inputs(shape, dtype)
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    got = reference.moe_experts(*args)
    assert got.dtype == dtype and got.shape == args[0].shape and got.is_contiguous()
    assert_within(got, plain_moe_experts(*args), dtype)
    for arg, kept in zip(args, before, strict=True):
        if isinstance(arg, torch.Tensor):
            assert torch.equal(arg, kept), "an input was modified"


def test_moe_experts_float64_matches_the_formula_tightly():
    args = experts_inputs(SHAPES[5], torch.float64)
    got = reference.moe_experts(*args)
    torch.testing.assert_close(got, plain_moe_experts(*args), atol=1e-12, rtol=1e-12)


def test_remote_experts_contribute_nothing():
    shape = ExpertsShape("all remote", 4, 2, 2, 32, 16, local_ids=(0, 1))
    x, w13, w2, weights, ids, _, act, on_input = experts_inputs(shape, torch.float32)
    expert_map = torch.tensor([0, 1, -1, -1], dtype=torch.int32)
    remote = torch.tensor([[2, 3]] * 4, dtype=torch.int32)  # experts 2 and 3 live elsewhere
    out = reference.moe_experts(x, w13, w2, weights, remote, expert_map, act, on_input)
    assert torch.equal(out, torch.zeros_like(out))
    mixed = torch.tensor([[0, 2], [3, 1], [1, 0], [2, 3]], dtype=torch.int32)
    out = reference.moe_experts(x, w13, w2, weights, mixed, expert_map, act, on_input)
    assert_within(out, plain_moe_experts(x, w13, w2, weights, mixed, expert_map, act, on_input),
                  torch.float32)  # fmt: skip
    assert torch.equal(out[3], torch.zeros_like(out[3]))


def test_slot_order_within_a_token_does_not_matter():
    args = list(experts_inputs(SHAPES[5], torch.float32))
    first = reference.moe_experts(*args)
    args[3], args[4] = args[3].flip(-1), args[4].flip(-1)
    torch.testing.assert_close(reference.moe_experts(*args), first)


def test_zero_tokens():
    x, w13, w2, weights, ids, *rest = experts_inputs(SHAPES[1], torch.bfloat16)
    out = reference.moe_experts(x[:0], w13, w2, weights[:0], ids[:0], *rest)
    assert out.shape == (0, x.shape[1]) and out.dtype == torch.bfloat16


def test_moe_experts_syncs_the_host_once_at_most():
    """The per-expert loop reads the token counts once (`.tolist()`, which the aten-level counter
    does not see); nothing else in the kernel syncs."""
    args = experts_inputs(SHAPES[6], torch.float32)
    with HostSyncCounter() as counter:
        reference.moe_experts(*args)
    assert counter.total == 0


def test_moe_experts_refuses_bad_arguments():
    args = list(experts_inputs(SHAPES[0], torch.float32))
    with pytest.raises(ValueError, match="activation must be one of silu, gelu, gelu_tanh"):
        reference.moe_experts(*args[:6], "relu2", False)
    with pytest.raises(ValueError, match="needs top_k == 1, not 2"):
        reference.moe_experts(*args[:6], "silu", True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_opcheck_low_precision_expert_map_and_strided_input(reference_ops, dtype):
    args = experts_inputs(SHAPES[6], dtype)
    opcheck(torch.ops.kunlun.moe_experts.default, args)
    opcheck(torch.ops.kunlun.moe_experts.default, experts_inputs(SHAPES[4], dtype))
    logits = distinct_logits(5, 24, dtype)
    opcheck(torch.ops.kunlun.moe_softmax_topk.default, (logits, 3, False))
    grouped = (logits, 4, True, 4, 2, "softmax", None, 1.0)
    opcheck(torch.ops.kunlun.moe_grouped_topk.default, grouped)


def test_the_custom_ops_run_the_reference(reference_ops):
    args = experts_inputs(SHAPES[6], torch.bfloat16)
    assert torch.equal(torch.ops.kunlun.moe_experts(*args), reference.moe_experts(*args))
    logits = distinct_logits(5, 24, torch.bfloat16)
    for got, want in zip(torch.ops.kunlun.moe_softmax_topk(logits, 3, True),
                         reference.moe_softmax_topk(logits, 3, True), strict=True):  # fmt: skip
        assert torch.equal(got, want)
