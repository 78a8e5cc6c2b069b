"""The plugin's quantized MoE methods (vllm_kunlun.quantization: moe_w8a8, moe_wna16) on vLLM's
own MoE layer, without an engine: built by vLLM's `FusedMoEFactory` with a compressed-tensors
config, as a model builds it, with the plugin's experts layer registered in place of vLLM's. The
outputs are checked against dense formulas written here. W8A8: per token and chosen expert,
quantize the input per token, dequantized GEMM, activation, quantize again, second GEMM,
weighted sum. W4A16: the checkpoint's packed int4 tensors unpacked here from the format (value
i of a word in bits 4i..4i+3), w = (q - z) * scale per group, then the float MLP. The engine
tests are in tests/test_quantized_models.py."""

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
from vllm_kunlun.quantization.moe_w8a8 import KunlunW8A8Int8MoEMethod
from vllm_kunlun.quantization.moe_wna16 import KunlunWNA16MoEMethod
from vllm_kunlun.quantization.routed_experts import KunlunRoutedExperts

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


# Weight-only 4-bit (compressed-tensors pack-quantized) ------------------------------------------


def pack_quantized(symmetric: bool, strategy: str = "group", group_size: int | None = 32):
    weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": strategy,
               "group_size": group_size, "dynamic": False}  # fmt: skip
    return CompressedTensorsConfig.from_config({
        "quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": [],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
    })  # fmt: skip


def pack_along_last(values: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' int4 packing: value i of eight in bits 4i..4i+3 of an int32."""
    words = torch.zeros(*values.shape[:-1], values.shape[-1] // 8, dtype=torch.int64)
    for i in range(8):
        words |= values[..., i::8].to(torch.int64) << (4 * i)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def load_random_int4(experts, symmetric: bool, seed=0):
    """Random packed weights, scales (and zero points) in the checkpoint's layout, then the
    method's processing; returns the dequantized weights [E, N, K] in float64."""
    g = torch.Generator().manual_seed(seed)
    dense = []
    for name in ("w13", "w2"):
        packed = getattr(experts, f"{name}_weight_packed")
        scale = getattr(experts, f"{name}_weight_scale")
        count, channels, depth = packed.shape[0], packed.shape[1], packed.shape[2] * 8
        groups = scale.shape[2]
        stored = torch.randint(0, 16, (count, channels, depth), generator=g)
        packed.data.copy_(pack_along_last(stored))
        scale.data.copy_(torch.rand(scale.shape, generator=g) * 0.02 + 0.005)
        zeros = torch.full((count, channels, groups), 8)
        if not symmetric:
            zeros = torch.randint(0, 16, (count, channels, groups), generator=g)
            # [E, N / 8, G], packed along N
            zero_point = getattr(experts, f"{name}_weight_zero_point")
            zero_point.data.copy_(pack_along_last(zeros.transpose(1, 2)).transpose(1, 2))
        per_group = depth // groups
        zeros, scales = (t.repeat_interleave(per_group, dim=2) for t in (zeros, scale.data))
        dense.append((stored - zeros).double() * scales.double())
    experts.quant_method.process_weights_after_loading(experts)
    return dense


def dense_float(x, w13, w2, logits):
    weights, ids = torch.softmax(logits.double(), dim=-1).topk(TOP_K, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(TOP_K):
            e = int(ids[t, j])
            gate, up = (w13[e] @ x[t].double()).chunk(2)
            out[t] += weights[t, j] * (w2[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize(
    ("symmetric", "strategy", "group_size"),
    [(True, "group", 32), (False, "group", 16), (True, "channel", None)],
    ids=["symmetric group 32", "zero points, group 16", "per channel"],
)
def test_int4_experts_run_the_plugin_method_and_equal_the_dense_formula(
    symmetric, strategy, group_size
):
    runner = build(pack_quantized(symmetric, strategy, group_size))
    experts = runner.routed_experts
    assert isinstance(experts, KunlunRoutedExperts)
    assert isinstance(experts.quant_method, KunlunWNA16MoEMethod)
    w13, w2 = load_random_int4(experts, symmetric)
    # The quant family's layout: packed [E, K, N / 8], scales [E, G, N], zeros [E, G, N / 8].
    assert experts.w13_weight_packed.shape == (EXPERTS, HIDDEN, 2 * INTERMEDIATE // 8)
    assert experts.w2_weight_scale.shape[::2] == (EXPERTS, HIDDEN)
    assert experts.w2_weight_zero_point.shape[2] == HIDDEN // 8
    x = torch.randn(5, HIDDEN)
    logits = torch.randn(5, EXPERTS)
    before = stats.snapshot()
    out = experts.quant_method.apply_monolithic(experts, x, logits)
    after = stats.snapshot()
    ran = {op for op in after if after[op] - before.get(op, 0)}
    assert ran == {"moe_softmax_topk", "moe_experts_wna16"}
    torch.testing.assert_close(out.double(), dense_float(x, w13, w2, logits), rtol=1e-4,
                               atol=1e-5)  # fmt: skip


def test_int4_experts_refuse_a_weight_that_is_not_packed():
    experts = build(pack_quantized(True)).routed_experts
    experts.w2_weight_packed = torch.nn.Parameter(experts.w2_weight_packed.float(),
                                                  requires_grad=False)  # fmt: skip
    with pytest.raises(ValueError, match="w2_weight_packed is torch.float32, expected torch.int32"):
        experts.quant_method.process_weights_after_loading(experts)
