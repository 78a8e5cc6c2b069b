"""The plugin's MoE method (vllm_kunlun.layers.moe) on vLLM's own MoE layers, without an engine.

Layers are built with vLLM's `FusedMoEFactory`, as models build them, with the plugin's method
registered in place of `UnquantizedFusedMoEMethod`. The method's output is checked against a
dense sum over the experts written here, with routing by vLLM's own CPU routing functions: so
each routing attribute of the layer reaches the plugin's ops as vLLM means it. Expert maps,
router weights on the input, and the variants the method refuses are covered too. The engine
tests (tests/test_moe_models.py) run whole models.
"""

import contextlib
import types

import pytest
import torch
import torch.nn.functional as F
from vllm.config import CompilationConfig, ParallelConfig, VllmConfig, set_current_vllm_config
from vllm.forward_context import set_forward_context
from vllm.model_executor import custom_op
from vllm.model_executor.layers.fused_moe import config as moe_config_module
from vllm.model_executor.layers.fused_moe.layer import FusedMoEFactory
from vllm.model_executor.layers.fused_moe.router.cpu_router import _grouped_topk, _softmax_topk

from vllm_kunlun.layers import register_layers
from vllm_kunlun.layers.moe import KunlunUnquantizedFusedMoEMethod
from vllm_kunlun.ops import stats

HIDDEN, INTERMEDIATE = 64, 32


@contextlib.contextmanager
def plugin_layers_registered():
    """The plugin's layers registered with vLLM, as in a Kunlun worker, then unregistered."""
    saved = dict(custom_op.op_registry_oot)
    register_layers()
    try:
        yield
    finally:
        custom_op.op_registry_oot.clear()
        custom_op.op_registry_oot.update(saved)


@pytest.fixture(autouse=True)
def plugin_layers():
    with plugin_layers_registered():
        yield


_built = iter(range(10**6))


def build_moe(
    num_experts: int = 6,
    top_k: int = 3,
    parallel: ParallelConfig | None = None,
    tp_size: int = 1,
    seed: int = 0,
    **kwargs,
):
    """vLLM's MoE runner for one layer, its experts filled with random weights."""
    config = VllmConfig(compilation_config=CompilationConfig(custom_ops=["all"]),
                        parallel_config=parallel or ParallelConfig())  # fmt: skip
    with set_current_vllm_config(config):
        runner = FusedMoEFactory(
            num_experts=num_experts, top_k=top_k, hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE, params_dtype=torch.float32, tp_size=tp_size,
            dp_size=1, pcp_size=1, prefix=f"model.layers.{next(_built)}.mlp.experts", **kwargs,
        )  # fmt: skip
    runner.test_config = config  # for the forward context of a whole runner's forward
    generator = torch.Generator().manual_seed(seed)
    experts = runner.routed_experts
    for weight in (experts.w13_weight, experts.w2_weight):
        weight.data.copy_(torch.randn(weight.shape, generator=generator) * 0.2)
    return runner


def dense_moe(x, w13, w2, weights, ids, activation=F.silu, on_input=False) -> torch.Tensor:
    """sum_j w_tj * mlp_e(x_t) token by token, slot by slot: the definition, no grouping."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e, w = int(ids[t, j]), float(weights[t, j])
            row = x[t] * w if on_input else x[t]
            gate, up = (w13[e] @ row).chunk(2)
            y = w2[e] @ (activation(gate) * up)
            out[t] += y if on_input else w * y
    return out


def run_method(runner, x, logits) -> tuple[torch.Tensor, dict[str, int]]:
    """The plugin method's output and the plugin ops it called."""
    experts = runner.routed_experts
    before = stats.snapshot()
    out = experts.quant_method.apply_monolithic(experts, x, logits)
    after = stats.snapshot()
    ran = {op: after[op] - before.get(op, 0) for op in after}
    return out, {op: count for op, count in ran.items() if count}


#: Routing variants: (FusedMoEFactory arguments, number of experts, top-k, the plugin's
#: routing op, vLLM's routing of the same layer as a function of the logits and the bias).
ROUTINGS = {
    "softmax": ({"renormalize": False}, 6, 3, "moe_softmax_topk",
                lambda logits, bias: _softmax_topk(logits, 3, False)),
    "softmax-renormalized": ({"renormalize": True}, 6, 3, "moe_softmax_topk",
                             lambda logits, bias: _softmax_topk(logits, 3, True)),
    # GLM-4.5 / DeepSeek-V3: sigmoid, correction bias, grouped, scaled.
    "grouped-sigmoid-bias": (
        {"renormalize": True, "use_grouped_topk": True, "num_expert_group": 4,
         "topk_group": 2, "scoring_func": "sigmoid", "routed_scaling_factor": 2.5}, 8, 3,
        "moe_grouped_topk",
        lambda logits, bias: _grouped_topk(logits, 3, True, 4, 2, "sigmoid", 2.5, bias)),
    "grouped-softmax": (
        {"renormalize": False, "use_grouped_topk": True, "num_expert_group": 3,
         "topk_group": 1, "scoring_func": "softmax"}, 9, 2, "moe_grouped_topk",
        lambda logits, bias: _grouped_topk(logits, 2, False, 3, 1, "softmax", 1.0, None)),
    # ERNIE-4.5: softmax, experts chosen with a correction bias, no groups.
    "softmax-bias": ({"renormalize": True}, 6, 3, "moe_grouped_topk",
                     lambda logits, bias: _grouped_topk(logits, 3, True, 1, 1, "softmax", 1.0,
                                                        bias)),
    "sigmoid": ({"renormalize": True, "scoring_func": "sigmoid"}, 5, 2, "moe_grouped_topk",
                lambda logits, bias: _grouped_topk(logits, 2, True, 1, 1, "sigmoid", 1.0, None)),
}  # fmt: skip
BIASED = ("grouped-sigmoid-bias", "softmax-bias")


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_each_routing_reaches_the_plugin_ops_as_vllm_routes(routing):
    kwargs, num_experts, top_k, routing_op, vllm_routing = ROUTINGS[routing]
    torch.manual_seed(1)
    bias = torch.rand(num_experts) * 0.4 - 0.2 if routing in BIASED else None
    runner = build_moe(num_experts, top_k, e_score_correction_bias=bias, **kwargs)
    experts = runner.routed_experts
    assert isinstance(experts.quant_method, KunlunUnquantizedFusedMoEMethod)
    assert runner.is_monolithic and experts.quant_method.refusal is None
    assert experts.quant_method.routing_op == routing_op

    x, logits = torch.randn(5, HIDDEN), torch.randn(5, num_experts)  # some experts stay idle
    out, ran = run_method(runner, x, logits)
    assert ran == {routing_op: 1, "moe_experts": 1}
    weights, ids = vllm_routing(logits, bias)
    want = dense_moe(x, experts.w13_weight, experts.w2_weight, weights, ids)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_the_runner_calls_the_plugin_method_with_the_router_logits():
    """vLLM's MoE runner, not the method directly: no vLLM router or kernel in between."""
    runner = build_moe(8, 2, renormalize=True)
    x, logits = torch.randn(4, HIDDEN), torch.randn(4, 8)
    before = stats.snapshot()
    with set_forward_context(None, runner.test_config):
        out = runner(x, logits)
    after = stats.snapshot()
    assert after["moe_experts"] - before.get("moe_experts", 0) == 1
    assert after["moe_softmax_topk"] - before.get("moe_softmax_topk", 0) == 1
    weights, ids = _softmax_topk(logits, 2, True)
    experts = runner.routed_experts
    want = dense_moe(x, experts.w13_weight, experts.w2_weight, weights, ids)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_router_weight_on_the_input_with_top_1():
    runner = build_moe(4, 1, renormalize=False, apply_router_weight_on_input=True)
    x, logits = torch.randn(6, HIDDEN), torch.randn(6, 4)
    out, _ = run_method(runner, x, logits)
    weights, ids = _softmax_topk(logits, 1, False)
    experts = runner.routed_experts
    want = dense_moe(x, experts.w13_weight, experts.w2_weight, weights, ids, on_input=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_gelu_experts():
    runner = build_moe(4, 2, renormalize=True, activation="gelu")
    x, logits = torch.randn(3, HIDDEN), torch.randn(3, 4)
    out, _ = run_method(runner, x, logits)
    weights, ids = _softmax_topk(logits, 2, True)
    experts = runner.routed_experts
    want = dense_moe(x, experts.w13_weight, experts.w2_weight, weights, ids, activation=F.gelu)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def expert_parallel_layer(monkeypatch, rank: int, num_experts: int = 6):
    """Rank `rank` of 2 with --enable-expert-parallel (TP 2 flattened into EP 2)."""
    monkeypatch.setattr(moe_config_module, "get_tensor_model_parallel_rank", lambda: rank)
    return build_moe(num_experts, 3, ParallelConfig(enable_expert_parallel=True), tp_size=2,
                     renormalize=True)  # fmt: skip


def test_expert_parallel_ranks_each_run_their_experts_and_add_up_to_the_layer(monkeypatch):
    """With EP each rank holds 3 of 6 experts and vLLM gives the method an expert map; the
    method passes it to the experts op, and the two ranks' outputs (which vLLM all-reduces)
    add up to the whole layer on one device."""
    full = build_moe(6, 3, renormalize=True)
    x, logits = torch.randn(5, HIDDEN), torch.randn(5, 6)
    want, _ = run_method(full, x, logits)
    total = torch.zeros_like(want)
    for rank in (0, 1):
        experts = expert_parallel_layer(monkeypatch, rank).routed_experts
        method = experts.quant_method
        assert method.refusal is None
        local = experts.expert_map.tolist()
        assert local == ([0, 1, 2, -1, -1, -1] if rank == 0 else [-1, -1, -1, 0, 1, 2])
        for weight, source in ((experts.w13_weight, full.routed_experts.w13_weight),
                               (experts.w2_weight, full.routed_experts.w2_weight)):  # fmt: skip
            weight.data.copy_(source[3 * rank : 3 * rank + 3])
        part = method.apply_monolithic(experts, x, logits)
        assert not torch.allclose(part, want, atol=1e-3)  # half the experts: not the whole layer
        total += part
    torch.testing.assert_close(total, want, atol=1e-5, rtol=1e-5)


def _custom_routing(hidden_states, gating_output, topk, renormalize):
    return _softmax_topk(gating_output, topk, renormalize)


#: Variants the plugin's ops do not implement: (FusedMoEFactory arguments, what the refusal
#: names). Each is refused at start-up by the route report, with what to use instead.
REFUSED = {
    "custom-routing": ({"custom_routing_function": _custom_routing}, "custom MoE routing"),
    "gpt-oss-experts": ({"has_bias": True, "activation": "swigluoai", "swiglu_limit": 7.0},
                        "MoE experts with biases (w13_bias / w2_bias, GPT-OSS style); MoE expert "
                        "activation 'swigluoai'"),
    "swigluoai": ({"activation": "swigluoai"}, "activation 'swigluoai'"),
    "swiglu-limit": ({"swiglu_limit": 7.0}, "swiglu_limit"),
    "sqrtsoftplus": ({"scoring_func": "sqrtsoftplus",
                      "e_score_correction_bias": torch.zeros(6)}, "scoring function"),
    "weight-on-input-top-3": ({"apply_router_weight_on_input": True}, "top-k 3"),
}  # fmt: skip


@pytest.mark.parametrize("variant", list(REFUSED))
def test_unsupported_variants_are_refused_naming_what(variant):
    kwargs, says = REFUSED[variant]
    method = build_moe(6, 3, **kwargs).routed_experts.quant_method
    assert method.refusal is not None and says in method.refusal.what, method.refusal
    assert "Qwen3-MoE" in method.refusal.instead


def test_expert_load_balancing_is_refused_when_the_layer_is_built():
    """vLLM's ParallelConfig already refuses --enable-eplb off CUDA, ROCm and Intel XPUs; the
    method refuses it too, should a config get there."""
    moe = types.SimpleNamespace(moe_parallel_config=types.SimpleNamespace(enable_eplb=True))
    with pytest.raises(ValueError, match="--enable-eplb"):
        KunlunUnquantizedFusedMoEMethod(moe)


def test_on_a_kunlun_xpu_vllm_picks_no_kernel_and_the_plugin_method_runs(monkeypatch):
    """vLLM's backend oracle answers OOT for an out-of-tree platform (both Kunlun platforms)
    and builds no kernel of its own; the plugin's method does not need one."""
    from vllm.model_executor.layers.fused_moe.oracle import unquantized as oracle

    out_of_tree = types.SimpleNamespace(is_tpu=lambda: False, is_out_of_tree=lambda: True)
    monkeypatch.setattr(oracle, "current_platform", out_of_tree)
    runner = build_moe(6, 3, renormalize=True)
    method = runner.routed_experts.quant_method
    assert method.unquantized_backend == oracle.UnquantizedMoeBackend.OOT
    assert method.experts_cls is None and method.moe_kernel is None and method.is_monolithic
    x, logits = torch.randn(4, HIDDEN), torch.randn(4, 6)
    out, ran = run_method(runner, x, logits)
    assert ran == {"moe_softmax_topk": 1, "moe_experts": 1}
    weights, ids = _softmax_topk(logits, 3, True)
    experts = runner.routed_experts
    want = dense_moe(x, experts.w13_weight, experts.w2_weight, weights, ids)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
