"""The plugin's W8A8 int8 MoE method (vllm_kunlun.quantization.moe_w8a8) on vLLM's own MoE layer,
without an engine: built by vLLM's `FusedMoEFactory` with a compressed-tensors W8A8 config, as a
model builds it, with the plugin's experts layer registered in place of vLLM's. Its output is
checked against a dense formula written here: per token and chosen expert, quantize the input
per token, dequantized GEMM, activation, quantize again, second GEMM, weighted sum. The engine
test is in tests/test_quantized_models.py."""

import pytest
import torch
import torch.nn.functional as F
from vllm.config import CompilationConfig, VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.fused_moe.layer import FusedMoEFactory
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
    CompressedTensorsConfig,
)

from tests.test_moe_layer import plugin_layers_registered
from vllm_kunlun.ops import stats
from vllm_kunlun.quantization import register_routed_experts
from vllm_kunlun.quantization.moe_w8a8 import KunlunRoutedExperts, KunlunW8A8Int8MoEMethod

#: The quant and MoE ops run the reference kernels (the emulated XPU's, and the spec).
pytestmark = pytest.mark.usefixtures("reference_ops")

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 64, 32, 6, 2
ARGS = {"num_bits": 8, "type": "int", "symmetric": True}


def compressed_tensors(acts: dict, weights_strategy: str = "channel", ignore=()):
    return CompressedTensorsConfig.from_config({
        "quant_method": "compressed-tensors", "format": "int-quantized", "ignore": list(ignore),
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": ARGS | {"strategy": weights_strategy, "dynamic": False},
            "input_activations": ARGS | acts,
        }},
    })  # fmt: skip


DYNAMIC = {"strategy": "token", "dynamic": True}


@pytest.fixture(autouse=True)
def plugin_layers():
    """The plugin's layers and experts layer registered, as in a Kunlun worker, then not."""
    with plugin_layers_registered():
        register_routed_experts()
        yield


_built = iter(range(10**6))


def build(quant_config):
    config = VllmConfig(compilation_config=CompilationConfig(custom_ops=["all"]))
    with set_current_vllm_config(config):
        return FusedMoEFactory(
            num_experts=EXPERTS, top_k=TOP_K, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
            params_dtype=torch.float32, tp_size=1, dp_size=1, pcp_size=1, renormalize=True,
            quant_config=quant_config, prefix=f"model.layers.{next(_built)}.mlp.experts",
        )  # fmt: skip


def load_random_int8(experts, seed=0):
    """int8 weights and per-channel scales as a checkpoint gives them, then the method's
    processing; returns the dequantized weights (float64) and the scales as loaded."""
    g = torch.Generator().manual_seed(seed)
    for name in ("w13", "w2"):
        weight = getattr(experts, f"{name}_weight")
        weight.data.copy_(torch.randint(-127, 128, weight.shape, generator=g, dtype=torch.int8))
        scale = getattr(experts, f"{name}_weight_scale")
        scale.data.copy_(torch.rand(scale.shape, generator=g) * 0.01 + 0.002)
    scales = (experts.w13_weight_scale.detach().clone(), experts.w2_weight_scale.detach().clone())
    w13 = experts.w13_weight.double() * scales[0].double()
    w2 = experts.w2_weight.double() * scales[1].double()
    experts.quant_method.process_weights_after_loading(experts)
    return w13, w2, scales


def fake_quant(x: torch.Tensor) -> torch.Tensor:
    """Symmetric per-token int8: absmax / 127 steps, round half to even."""
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    return torch.where(scale > 0, (x / scale).round().clamp(-127, 127) * scale, 0.0)


def dense_w8a8(x, w13, w2, logits):
    weights, ids = torch.softmax(logits.double(), dim=-1).topk(TOP_K, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(TOP_K):
            e = int(ids[t, j])
            gate, up = (w13[e] @ fake_quant(x[t].double())).chunk(2)
            act = fake_quant(F.silu(gate) * up)
            out[t] += weights[t, j] * (w2[e] @ act)
    return out


def test_w8a8_experts_run_the_plugin_method_and_equal_the_dense_formula():
    runner = build(compressed_tensors(DYNAMIC))
    experts = runner.routed_experts
    assert isinstance(experts, KunlunRoutedExperts)
    assert isinstance(experts.quant_method, KunlunW8A8Int8MoEMethod)
    assert experts.w13_weight.dtype == torch.int8
    w13, w2, (w13_scale, _) = load_random_int8(experts)
    # Kept as Kunlun's absmax per output channel [E, N]: scale x 127.
    torch.testing.assert_close(experts.w13_weight_scale, w13_scale.reshape(EXPERTS, -1) * 127)
    x = torch.randn(5, HIDDEN)
    x[2] = 0  # a token of zeros
    logits = torch.randn(5, EXPERTS)
    before = stats.snapshot()
    out = experts.quant_method.apply_monolithic(experts, x, logits)
    after = stats.snapshot()
    ran = {op for op in after if after[op] - before.get(op, 0)}
    assert ran == {"moe_softmax_topk", "moe_experts_w8a8"}
    torch.testing.assert_close(out.double(), dense_w8a8(x, w13, w2, logits), rtol=1e-4,
                               atol=1e-4)  # fmt: skip
    assert torch.equal(out[2], torch.zeros(HIDDEN))


def test_other_experts_keep_vllms_choice():
    """Unquantized (ignored) experts get the plugin's unquantized method; other schemes are left
    to vLLM (an engine refuses them earlier, in the platform's quantization check)."""
    from vllm_kunlun.layers.moe import KunlunUnquantizedFusedMoEMethod

    ignored = build(compressed_tensors(DYNAMIC, ignore=["re:.*experts.*"])).routed_experts
    assert isinstance(ignored.quant_method, KunlunUnquantizedFusedMoEMethod)
    assert build(None).routed_experts.quant_method.__class__ is KunlunUnquantizedFusedMoEMethod
    with pytest.raises(RuntimeError, match="Unsupported FusedMoe scheme"):
        build(compressed_tensors({"strategy": "tensor", "dynamic": False}))


def test_the_scales_must_be_int8_weights():
    experts = build(compressed_tensors(DYNAMIC)).routed_experts
    experts.w13_weight = torch.nn.Parameter(experts.w13_weight.float(), requires_grad=False)
    with pytest.raises(ValueError, match="w13_weight is torch.float32, expected torch.int8"):
        experts.quant_method.process_weights_after_loading(experts)
