"""The MoE family's Kunlun binding (vllm_kunlun/ops/moe/kunlun.py) against the recorded
kunlun_ops API (KUNLUN.md §2f), through the stand-in library (tests/standin): every call is
checked against the recorded contract (positional or keyword form, fp32 scores, int32 indices,
[12, E] block statistics, contiguity, preallocated outputs) and must give the reference
kernels' results. This is all the verification the binding has until it runs on a Kunlun XPU."""

import pytest
import torch

from tests.ops.helpers import DTYPES, standin_calls
from tests.ops.moe.shared import (
    EXPERT_TOLERANCE,
    SHAPES,
    W8A8_SHAPES,
    WNA16_SHAPES,
    ExpertsShape,
    Int4ExpertsShape,
    assert_w8a8_within,
    assert_within,
    distinct_logits,
    experts_inputs,
    experts_w8a8_inputs,
    experts_wna16_inputs,
    plain_dequantized_experts,
    plain_moe_experts_w8a8,
)
from vllm_kunlun.ops.moe import kunlun as moe_kunlun
from vllm_kunlun.ops.moe import reference
from vllm_kunlun.ops.provider import Provider
from vllm_kunlun.ops.quant import reference as quant_reference

EXPERT_CALLS = {"gen_block_statistic": 1, "moe_pre_sorted": 1, "moe_fc": 2, "swiglu": 1,
                "moe_post": 1}  # fmt: skip
W8A8_CALLS = {**EXPERT_CALLS, "quant2d": 2}
WNA16_CALLS = {**EXPERT_CALLS, "awq_dequantize": 2}


def assert_same_routing(got, want) -> None:
    (weights, ids), (want_weights, want_ids) = got, want
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights)


# Loading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["moe_softmax_topk_norm", "moe_pre_sorted", "moe_post"])
def test_load_rejects_a_build_without_a_moe_kernel(use_standin, monkeypatch, name):
    ops = use_standin()
    monkeypatch.delattr(ops, name)
    with pytest.raises(RuntimeError, match=f"kunlun_ops.{name} is missing"):
        Provider("kunlun").prepare()


def test_load_rejects_moe_fc_without_the_recorded_keywords(use_standin, monkeypatch):
    ops = use_standin()
    monkeypatch.setattr(ops, "moe_fc", lambda x, weight, lod, idx, topk, y: None)
    with pytest.raises(RuntimeError, match="moe_fc does not accept sorted_tokens_num_lod"):
        Provider("kunlun").prepare()


def test_load_rejects_moe_fc_without_the_w8a8_keywords(use_standin, monkeypatch):
    """A moe_fc that takes no per-channel maxes cannot run the recorded W8A8 path."""
    ops = use_standin()
    monkeypatch.setattr(ops, "moe_fc", lambda *, x, weight, sorted_tokens_num_lod,
                        sorted_tokens_idx, moe_topk, y, act=None, w_perchannel_max=None,
                        topk_ids=None: None)  # fmt: skip
    with pytest.raises(RuntimeError, match="moe_fc does not accept x_perchannel_max\\."):
        Provider("kunlun").prepare()


def test_every_moe_op_is_bound(kunlun):
    for op in ("moe_softmax_topk", "moe_grouped_topk", "moe_experts", "moe_experts_w8a8"):
        assert kunlun.sources[op] == "moe.kunlun"


# Softmax top-k -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "experts", "top_k"), [(1, 8, 2), (3, 60, 4), (5, 6, 6)])
def test_softmax_topk_renormalized_uses_the_always_normalizing_kernel(
    kunlun, dtype, tokens, experts, top_k
):
    logits = distinct_logits(tokens, experts, dtype)
    got = kunlun.moe_softmax_topk(logits, top_k, True)
    assert_same_routing(got, reference.moe_softmax_topk(logits, top_k, True))
    assert standin_calls() == {"moe_softmax_topk_norm": 1}


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_topk_raw_uses_the_unnormalized_kernel(kunlun, dtype):
    logits = distinct_logits(7, 12, dtype)
    got = kunlun.moe_softmax_topk(logits, 3, False)
    assert_same_routing(got, reference.moe_softmax_topk(logits, 3, False))
    assert got[0].sum(-1).max() < 1  # really not normalized
    assert standin_calls() == {"moe_softmax_topk": 1}


def test_softmax_topk_strided_logits_are_made_dense(kunlun):
    logits = distinct_logits(6, 20, torch.float32)[:, 4:16]
    assert not logits.is_contiguous()
    got = kunlun.moe_softmax_topk(logits, 3, True)
    assert_same_routing(got, reference.moe_softmax_topk(logits, 3, True))


def test_standin_norm_kernel_always_renormalizes_and_checks_dtypes(use_standin):
    """The quirk the binding works around: there is no way to ask it not to normalize."""
    ops = use_standin()
    logits = distinct_logits(4, 16, torch.float32)
    weights = torch.empty(4, 2)
    ids = torch.empty(4, 2, dtype=torch.int32)
    ops.moe_softmax_topk_norm(logits, weights, ids, None, False)
    torch.testing.assert_close(weights.sum(-1), torch.ones(4))
    with pytest.raises(AssertionError, match="x must be torch.float32"):
        ops.moe_softmax_topk_norm(logits.bfloat16(), weights, ids, None, True)
    with pytest.raises(AssertionError, match="topk_index must be int32"):
        ops.moe_softmax_topk_norm(logits, weights, ids.long(), None, True)
    with pytest.raises(AssertionError, match="block_statistic must be int32 \\[12, E=16\\]"):
        ops.moe_softmax_topk_norm(logits, weights, ids, torch.zeros(8, 16, dtype=torch.int32),
                                  True)  # fmt: skip
    with pytest.raises(AssertionError, match="recorded form"):
        ops.moe_softmax_topk_norm(x=logits, normed_score=weights, topk_index=ids,
                                  block_statistic=None, stable=True)  # fmt: skip
    with pytest.raises(AssertionError, match="empty int32"):
        ops.moe_softmax_topk(logits, weights, ids, torch.zeros(12, 16, dtype=torch.int32))


# Grouped top-k -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_sigmoid_grouped_topk_with_bias_uses_the_kernel(kunlun, dtype, scale):
    logits = distinct_logits(9, 64, dtype)
    bias = torch.rand(64) * 0.1
    args = (logits, 8, True, 8, 4, "sigmoid", bias, scale)
    assert_same_routing(kunlun.moe_grouped_topk(*args), reference.moe_grouped_topk(*args))
    assert standin_calls() == {"moe_sigmoid_group_topk_norm": 1}


@pytest.mark.parametrize(
    "case",
    [
        (60, 6, 10, 3, "softmax", False, True),  # softmax grouped: no recorded kernel
        (40, 5, 5, 3, "softmax", True, True),
        (48, 6, 6, 3, "sigmoid", False, True),  # no bias: group scoring not recorded
        (64, 8, 8, 4, "sigmoid", True, False),  # the kernel always normalizes
        (640, 8, 8, 4, "sigmoid", True, True),  # above 512 experts
    ],
)
def test_grouped_topk_the_kernel_does_not_cover_runs_the_reference(kunlun, case):
    experts, top_k, groups, topk_group, scoring, with_bias, renormalize = case
    logits = distinct_logits(5, experts, torch.bfloat16)
    bias = torch.rand(experts) * 0.1 if with_bias else None
    args = (logits, top_k, renormalize, groups, topk_group, scoring, bias, 1.0)
    assert_same_routing(kunlun.moe_grouped_topk(*args), reference.moe_grouped_topk(*args))
    assert standin_calls() == {}


def test_standin_sigmoid_group_kernel_checks_its_contract(use_standin):
    ops = use_standin()
    logits = distinct_logits(3, 16, torch.float32)
    good = dict(x=logits, norm_score=torch.empty(3, 2), topk_index=torch.empty(3, 2,
                dtype=torch.int32), block_static=torch.zeros(12, 16, dtype=torch.int32),
                bias=torch.zeros(16), n_group=4, topk_group=2, scale=1.0)  # fmt: skip
    ops.moe_sigmoid_group_topk_norm(**good)
    with pytest.raises(AssertionError, match="block_static must be zero-initialized"):
        ops.moe_sigmoid_group_topk_norm(**{**good, "block_static": torch.ones(12, 16,
                                           dtype=torch.int32)})  # fmt: skip
    with pytest.raises(AssertionError, match="scale must be a float"):
        ops.moe_sigmoid_group_topk_norm(**{**good, "scale": 1})
    with pytest.raises(AssertionError, match="recorded form"):
        ops.moe_sigmoid_group_topk_norm(*good.values())


# Experts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_moe_experts(kunlun, dtype, shape):
    args = experts_inputs(shape, dtype)
    got = kunlun.moe_experts(*args)
    assert got.dtype == dtype and got.shape == args[0].shape and got.is_contiguous()
    assert_within(got, reference.moe_experts(*args).double(), dtype)
    calls = dict(EXPERT_CALLS)
    if shape.activation != "silu":
        del calls["swiglu"]  # gelu: PyTorch between the two moe_fc calls
    assert standin_calls() == calls


def test_remote_slots_go_to_expert_zero_with_weight_zero(kunlun, monkeypatch):
    """The recorded kernels know no remote experts: ids are mapped to local ones, remote slots
    become local expert 0 with weight 0."""
    seen = {}
    post = moe_kunlun.library().moe_post

    def spy(x, moe_index, normed_scale, dequant_scale, y):
        seen["weights"] = normed_scale.clone()
        return post(x, moe_index, normed_scale, dequant_scale, y)

    monkeypatch.setattr(moe_kunlun.library(), "moe_post", spy)
    shape = ExpertsShape("map", 3, 2, 2, 32, 16, local_ids=(1, 3))
    x, w13, w2, weights, _, expert_map, act, on_input = experts_inputs(shape, torch.float32)
    ids = torch.tensor([[0, 1], [3, 2], [2, 0]], dtype=torch.int32)  # 0 and 2 are remote
    got = kunlun.moe_experts(x, w13, w2, weights, ids, expert_map, act, on_input)
    want = reference.moe_experts(x, w13, w2, weights, ids, expert_map, act, on_input)
    torch.testing.assert_close(got, want)
    assert torch.equal(got[2], torch.zeros_like(got[2]))
    expected = weights.masked_fill(torch.tensor([[True, False], [False, True], [True, True]]), 0)
    assert torch.equal(seen["weights"], expected)


def test_router_weight_on_input_scales_x_and_posts_unit_weights(kunlun):
    args = experts_inputs(SHAPES[-1], torch.bfloat16)
    assert args[7] is True
    assert_within(kunlun.moe_experts(*args), reference.moe_experts(*args).double(),
                  torch.bfloat16)  # fmt: skip


def test_more_than_512_experts_run_the_reference(kunlun):
    shape = ExpertsShape("many", 4, 520, 2, 16, 8)
    args = experts_inputs(shape, torch.float32)
    torch.testing.assert_close(kunlun.moe_experts(*args), reference.moe_experts(*args))
    assert standin_calls() == {}


def test_zero_tokens_call_no_kernel(kunlun):
    x, w13, w2, weights, ids, *rest = experts_inputs(SHAPES[1], torch.bfloat16)
    out = kunlun.moe_experts(x[:0], w13, w2, weights[:0], ids[:0], *rest)
    assert out.shape == (0, x.shape[1]) and out.dtype == torch.bfloat16
    assert standin_calls() == {}


def test_moe_experts_refuses_what_the_reference_refuses(kunlun):
    args = list(experts_inputs(SHAPES[0], torch.float32))
    with pytest.raises(ValueError, match="activation must be one of"):
        kunlun.moe_experts(*args[:6], "relu2", False)
    with pytest.raises(ValueError, match="needs top_k == 1"):
        kunlun.moe_experts(*args[:6], "silu", True)


def test_standin_expert_kernels_check_their_contract(use_standin):
    ops = use_standin()
    x = torch.randn(4, 16)
    ids = torch.tensor([[0, 1], [2, 1], [1, 0], [2, 2]], dtype=torch.int32)
    statistic = torch.zeros(12, 3, dtype=torch.int32)
    outputs = (torch.empty(8, 16), torch.empty(8, dtype=torch.int32),
               torch.empty(3, dtype=torch.int32), torch.empty(4, dtype=torch.int32))  # fmt: skip
    with pytest.raises(AssertionError, match="gen_block_statistic's result"):
        ops.moe_pre_sorted(x, ids, statistic, *outputs)  # block_statistic not filled first
    with pytest.raises(AssertionError, match="local expert ids in \\[0, 3\\)"):
        ops.gen_block_statistic(ids + 1, statistic)
    ops.gen_block_statistic(ids, statistic)
    assert statistic.sum() == ids.numel()
    with pytest.raises(AssertionError, match="must be int32"):
        ops.moe_pre_sorted(x, ids.long(), statistic, *outputs)
    ops.moe_pre_sorted(x, ids, statistic, *outputs)
    moe_expand, moe_index, expert_m, lod = outputs
    assert expert_m.tolist() == [2, 3, 3] and lod.tolist() == [0, 2, 5, 8]
    torch.testing.assert_close(moe_expand[moe_index.long()], x.repeat_interleave(2, dim=0))

    w13 = torch.randn(3, 6, 16)
    fc = dict(x=moe_expand, weight=w13, sorted_tokens_num_lod=lod, sorted_tokens_idx=moe_index,
              moe_topk=2, y=torch.empty(4, 2, 6))  # fmt: skip
    ops.moe_fc(**fc)
    with pytest.raises(AssertionError, match="only act=None"):
        ops.moe_fc(**fc, act="SWISH_GLU")
    with pytest.raises(AssertionError, match="y must be preallocated as \\(4, 2, 6\\)"):
        ops.moe_fc(**{**fc, "y": torch.empty(8, 6)})
    with pytest.raises(AssertionError, match="weight must be torch.float32"):
        ops.moe_fc(**{**fc, "weight": w13.bfloat16()})
    with pytest.raises(AssertionError, match="contiguous"):
        ops.moe_fc(**{**fc, "x": torch.randn(16, 8).t()})

    scale = torch.rand(4, 2)
    y = torch.empty(4, 6)
    ops.moe_post(fc["y"], moe_index.view(4, 2), scale, torch.ones(4, 2), y)
    with pytest.raises(AssertionError, match="dequant_scale must be torch.float32"):
        ops.moe_post(fc["y"], moe_index.view(4, 2), scale, torch.ones(4, 2).half(), y)
    with pytest.raises(AssertionError, match="recorded form"):
        ops.moe_post(x=fc["y"], moe_index=moe_index.view(4, 2), normed_scale=scale,
                     dequant_scale=torch.ones(4, 2), y=y)  # fmt: skip


# W8A8 experts --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", W8A8_SHAPES, ids=str)
def test_moe_experts_w8a8(kunlun, dtype, shape):
    """The recorded W8A8 path gives the reference's result, up to swiglu's rounding (the
    stand-in's rounds twice in the activation dtype) moving a quantized activation by one."""
    args = experts_w8a8_inputs(shape, dtype)
    got = kunlun.moe_experts_w8a8(*args)
    assert got.dtype == dtype and got.shape == args[0].shape and got.is_contiguous()
    _, step = plain_moe_experts_w8a8(*args)
    assert_w8a8_within(got, reference.moe_experts_w8a8(*args), step, dtype)
    calls = dict(W8A8_CALLS)
    if shape.activation != "silu":
        del calls["swiglu"]  # gelu: PyTorch between the two moe_fc calls
    assert standin_calls() == calls


def test_moe_experts_w8a8_passes_the_recorded_quantized_moe_fc(kunlun, monkeypatch):
    """int8 rows with their per-row max [M·k, 1], int8 weights with their per-channel max
    [E, N] float32, the sorted ids and act=None, into y in the activation dtype."""
    seen = []
    fc = moe_kunlun.library().moe_fc

    def spy(**kwargs):
        seen.append({k: v.clone() if isinstance(v, torch.Tensor) else v
                     for k, v in kwargs.items()})  # fmt: skip
        return fc(**kwargs)

    monkeypatch.setattr(moe_kunlun.library(), "moe_fc", spy)
    shape = W8A8_SHAPES[6]  # expert map: 4 local experts
    x, w13, a13, w2, a2, weights, ids, expert_map, act, on_input = experts_w8a8_inputs(
        shape, torch.bfloat16
    )
    kunlun.moe_experts_w8a8(x, w13, a13, w2, a2, weights, ids, expert_map, act, on_input)
    slots, inter = shape.tokens * shape.top_k, shape.inter
    local_ids = expert_map[ids.long()].clamp(min=0).to(torch.int32)
    stages = ((seen[0], shape.hidden, w13, a13, 2 * inter), (seen[1], inter, w2, a2, shape.hidden))
    for call, width, weight, absmax, y_width in stages:
        assert call["x"].dtype == torch.int8 and call["x"].shape == (slots, width)
        assert call["x_perchannel_max"].dtype == torch.float32
        assert call["x_perchannel_max"].shape == (slots, 1)
        assert torch.equal(call["weight"], weight)
        assert torch.equal(call["w_perchannel_max"], absmax)
        assert call["y"].dtype == torch.bfloat16
        assert call["y"].shape == (shape.tokens, shape.top_k, y_width)
        assert torch.equal(call["topk_ids"], local_ids)
        assert call["act"] is None and call["moe_topk"] == shape.top_k
    # Each row's max is the absmax of the row moe_fc gets (the sorted x, then the activation).
    assert bool((seen[0]["x"].abs().amax(-1) == 127).all())


def test_moe_experts_w8a8_more_than_512_experts_run_the_reference(kunlun):
    shape = ExpertsShape("many", 4, 520, 2, 16, 8)
    args = experts_w8a8_inputs(shape, torch.float32)
    assert torch.equal(kunlun.moe_experts_w8a8(*args), reference.moe_experts_w8a8(*args))
    assert standin_calls() == {}


def test_moe_experts_w8a8_zero_tokens_call_no_kernel(kunlun):
    x, w13, a13, w2, a2, weights, ids, *rest = experts_w8a8_inputs(W8A8_SHAPES[1],
                                                                   torch.bfloat16)  # fmt: skip
    out = kunlun.moe_experts_w8a8(x[:0], w13, a13, w2, a2, weights[:0], ids[:0], *rest)
    assert out.shape == (0, x.shape[1]) and out.dtype == torch.bfloat16
    assert standin_calls() == {}


def test_moe_experts_w8a8_refuses_what_the_reference_refuses(kunlun):
    args = list(experts_w8a8_inputs(W8A8_SHAPES[0], torch.float32))
    with pytest.raises(ValueError, match="activation must be one of"):
        kunlun.moe_experts_w8a8(*args[:8], "relu2", False)
    with pytest.raises(ValueError, match="needs top_k == 1"):
        kunlun.moe_experts_w8a8(*args[:8], "silu", True)


def test_standin_quantized_moe_fc_checks_its_contract(use_standin):
    ops = use_standin()
    ids = torch.tensor([[0, 1], [2, 1], [1, 0], [2, 2]], dtype=torch.int32)
    lod = torch.tensor([0, 2, 5, 8], dtype=torch.int32)
    order = torch.argsort(ids.reshape(-1).long(), stable=True)
    index = torch.argsort(order).to(torch.int32)
    x_q = torch.randint(-127, 128, (8, 16), dtype=torch.int8)
    w = torch.randint(-127, 128, (3, 6, 16), dtype=torch.int8)
    fc = dict(x=x_q, weight=w, sorted_tokens_num_lod=lod, sorted_tokens_idx=index, moe_topk=2,
              y=torch.empty(4, 2, 6, dtype=torch.bfloat16), x_perchannel_max=torch.rand(8, 1),
              w_perchannel_max=torch.rand(3, 6), topk_ids=ids, act=None)  # fmt: skip
    ops.moe_fc(**fc)
    y = fc["y"].view(8, 6)
    for expert, (start, end) in enumerate(((0, 2), (2, 5), (5, 8))):
        want = quant_reference.int8_scaled_mm(x_q[start:end], fc["x_perchannel_max"][start:end],
                                              w[expert], fc["w_perchannel_max"][expert], None,
                                              None, torch.bfloat16)  # fmt: skip
        assert torch.equal(y[start:end], want)
    ops.moe_fc(**{**fc, "w_perchannel_max": fc["w_perchannel_max"][..., None]})  # vLLM's shape
    bad = {
        "needs x_perchannel_max": {"x_perchannel_max": None},
        "x_perchannel_max must be \\[M·k=8, 1\\]": {"x_perchannel_max": torch.rand(4, 1)},
        "x_perchannel_max must be torch.float32": {"x_perchannel_max": torch.rand(8, 1).half()},
        "w_perchannel_max must be \\[E=3, N=6\\]": {"w_perchannel_max": torch.rand(6)},
        "w_perchannel_max must be contiguous": {"w_perchannel_max": torch.rand(6, 3).t()},
        "weight must be int8": {"weight": w.float()},
        "passes topk_ids": {"topk_ids": None},
        "topk_ids must be int32": {"topk_ids": ids.long()},
        "sorted into sorted_tokens_num_lod": {"topk_ids": torch.zeros_like(ids)},
        "y must be fp32/fp16/bf16": {"y": torch.empty(4, 2, 6, dtype=torch.int32)},
        "only act=None": {"act": "SWISH_GLU"},
    }
    for message, change in bad.items():
        with pytest.raises(AssertionError, match=message):
            ops.moe_fc(**{**fc, **change})
    floating = {**fc, "x": torch.randn(8, 16), "weight": w.float(), "y": torch.empty(4, 2, 6)}
    with pytest.raises(AssertionError, match="x_perchannel_max is not modeled"):
        ops.moe_fc(**floating)  # the float form takes no per-channel max


# Weight-only int4 (wNa16) experts ----------------------------------------------------------------


def assert_wna16_within(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """awq_dequantize writes fp16 weights only: float32 activations see fp16's weight precision
    (2^-11 relative), judged against the largest output like check-kernels' wNa16 cases (rtol
    1e-3); the 16-bit dtypes within the experts' usual tolerance."""
    atol, rtol = (1e-5, 1e-3) if dtype == torch.float32 else EXPERT_TOLERANCE[dtype]
    assert got.shape == want.shape
    error = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    scale = want.double().abs().max().item() if want.numel() else 0.0
    assert error <= atol + rtol * scale, f"max error {error:.3g}, scale {scale:.3g}"


def test_moe_experts_wna16_is_bound(kunlun):
    assert kunlun.sources["moe_experts_wna16"] == "moe.kunlun"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", WNA16_SHAPES, ids=str)
def test_moe_experts_wna16(kunlun, dtype, shape):
    """The experts dequantized (awq_dequantize, once per weight), then the recorded float path."""
    args = experts_wna16_inputs(shape, dtype)
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    got = kunlun.moe_experts_wna16(*args)
    assert got.dtype == dtype and got.shape == args[0].shape and got.is_contiguous()
    assert_wna16_within(got, reference.moe_experts_wna16(*args), dtype)
    calls = dict(WNA16_CALLS)
    if shape.activation != "silu":
        del calls["swiglu"]  # gelu: PyTorch between the two moe_fc calls
    assert standin_calls() == calls
    for arg, kept in zip(args, before, strict=True):
        if isinstance(arg, torch.Tensor):
            assert torch.equal(arg, kept), "an input was modified"


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [(WNA16_SHAPES[1], torch.float16), (WNA16_SHAPES[-1], torch.bfloat16)],
    ids=["fp16, 2 and 3 groups", "bf16, strided weights, groups of one row"],
)
def test_moe_experts_wna16_dequantizes_all_experts_at_once_for_moe_fc(
    kunlun, monkeypatch, shape, dtype
):
    """One awq_dequantize per weight over all experts stacked along K: w_packed [E·K, N / 8],
    scales [E·G, N], zeros [E·G, N / 8], group_m = K / G (so row e·K + k falls in group
    e·G + k // (K / G), that expert's own), into fp16 [E·K, N]; then moe_fc gets the float
    weights in the activation dtype, [E, N, K] and contiguous: the plain dequantization of
    each expert rounded to fp16 (the kernel's only weight dtype), then to the activation dtype."""
    library = moe_kunlun.library()
    seen: dict[str, list[dict]] = {"awq_dequantize": [], "moe_fc": []}

    def spying(name):
        kernel = getattr(library, name)

        def spy(**kwargs):
            seen[name].append({k: v.clone() if isinstance(v, torch.Tensor) else v
                               for k, v in kwargs.items()})  # fmt: skip
            kernel(**kwargs)
            if name == "awq_dequantize":
                seen[name][-1]["weight"] = kwargs["weight"].clone()  # what the kernel wrote

        monkeypatch.setattr(library, name, spy)

    spying("awq_dequantize")
    spying("moe_fc")
    args = experts_wna16_inputs(shape, dtype)
    x, w13p, w13s, w13z, w2p, w2s, w2z = args[:7]
    got = kunlun.moe_experts_wna16(*args)
    assert_wna16_within(got, reference.moe_experts_wna16(*args), dtype)

    experts, (groups13, groups2) = shape.experts, shape.groups
    hidden, inter = shape.hidden, shape.inter
    weights = ((w13p, w13s, w13z, hidden, groups13, 2 * inter),
               (w2p, w2s, w2z, inter, groups2, hidden))  # fmt: skip
    assert len(seen["awq_dequantize"]) == 2 and len(seen["moe_fc"]) == 2
    for call, fc, (packed, scales, zeros, depth, groups, channels) in zip(
        seen["awq_dequantize"], seen["moe_fc"], weights, strict=True
    ):
        assert call["group_m"] == depth // groups
        assert (call["quant_type"], call["align_type"]) == (0, 0)
        assert torch.equal(call["qweight"], packed.reshape(experts * depth, channels // 8))
        assert torch.equal(call["scales"], scales.reshape(experts * groups, channels))
        assert torch.equal(call["zeros"], zeros.reshape(experts * groups, channels // 8))
        assert call["weight"].dtype == torch.float16
        assert call["weight"].shape == (experts * depth, channels)
        fp16 = plain_dequantized_experts(packed, scales, zeros, torch.float16)  # [E, K, N]
        assert torch.equal(call["weight"].double(), fp16.reshape(experts * depth, channels))
        weight = fc["weight"]
        assert weight.dtype == dtype and weight.is_contiguous()
        assert weight.shape == (experts, channels, depth)
        assert torch.equal(weight, fp16.transpose(1, 2).to(dtype))
        assert fc["x"].dtype == dtype and fc["y"].dtype == dtype
        assert fc.get("act") is None and fc["moe_topk"] == shape.top_k


@pytest.mark.parametrize(
    ("dtype", "scales_dtype"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.bfloat16),
    ],
)
def test_moe_experts_wna16_scales_dtype_does_not_round_the_fp16_weight(
    kunlun, monkeypatch, dtype, scales_dtype
):
    """Scales in any float dtype: the fp16 weight awq_dequantize writes is cast to the
    activation dtype for moe_fc (the module docstring), not through the scales' dtype."""
    library = moe_kunlun.library()
    fc = library.moe_fc
    weights = []

    def spy(**kwargs):
        weights.append(kwargs["weight"].clone())
        return fc(**kwargs)

    monkeypatch.setattr(library, "moe_fc", spy)
    args = list(experts_wna16_inputs(WNA16_SHAPES[5], dtype))
    args[2], args[5] = args[2].to(scales_dtype), args[5].to(scales_dtype)
    got = kunlun.moe_experts_wna16(*args)
    for weight, (packed, scales, zeros) in zip(weights, (args[1:4], args[4:7]), strict=True):
        fp16 = plain_dequantized_experts(packed, scales, zeros, torch.float16)
        assert torch.equal(weight, fp16.transpose(1, 2).to(dtype))
    assert got.dtype == dtype
    assert_wna16_within(got, reference.moe_experts_wna16(*args), dtype)


def test_moe_experts_wna16_more_than_512_experts_run_the_reference(kunlun):
    shape = Int4ExpertsShape("many", 4, 520, 2, 16, 8, groups=(2, 1))
    args = experts_wna16_inputs(shape, torch.float32)
    assert torch.equal(kunlun.moe_experts_wna16(*args), reference.moe_experts_wna16(*args))
    assert standin_calls() == {}


def test_moe_experts_wna16_zero_tokens_run_no_expert_kernel(kunlun):
    """The weights are dequantized before the experts run (every call dequantizes every local
    expert, ops/moe/kunlun.py), so awq_dequantize still runs; nothing else does."""
    x, *weights, topk_weights, ids, expert_map, act, flag = experts_wna16_inputs(
        WNA16_SHAPES[1], torch.bfloat16
    )
    out = kunlun.moe_experts_wna16(x[:0], *weights, topk_weights[:0], ids[:0], expert_map, act,
                                   flag)  # fmt: skip
    assert out.shape == (0, x.shape[1]) and out.dtype == torch.bfloat16
    assert standin_calls() == {"awq_dequantize": 2}


def test_moe_experts_wna16_refuses_what_the_reference_refuses(kunlun):
    args = list(experts_wna16_inputs(WNA16_SHAPES[0], torch.float32))
    with pytest.raises(ValueError, match="activation must be one of"):
        kunlun.moe_experts_wna16(*args[:10], "relu2", False)
    x, w13p, w13s, w13z, *rest = args
    with pytest.raises(ValueError, match="x has H = 72 features"):
        kunlun.moe_experts_wna16(torch.randn(x.shape[0], 72), w13p, w13s, w13z, *rest)
    with pytest.raises(ValueError, match="disagree on I"):
        kunlun.moe_experts_wna16(x, w13p, w13s, w13z, args[4][:, :24], *args[5:])
    groups3 = (w13s[:, :1].expand(-1, 3, -1), w13z[:, :1].expand(-1, 3, -1))
    with pytest.raises(ValueError, match="is not a multiple of the number of groups G = 3"):
        kunlun.moe_experts_wna16(x, w13p, *groups3, *rest)
    assert standin_calls() == {}  # refused before any kernel
    with pytest.raises(ValueError, match="needs top_k == 1"):
        kunlun.moe_experts_wna16(*args[:10], "silu", True)
