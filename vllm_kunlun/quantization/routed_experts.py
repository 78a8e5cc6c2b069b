"""The plugin's experts layer: vLLM's `RoutedExperts`, choosing the plugin's quantized MoE methods.

vLLM's compressed-tensors MoE methods ask vLLM's MoE backend oracles (int8, wNa16) for a kernel,
and those oracles have no out-of-tree entry: on a Kunlun platform they raise while the model is
built. So the plugin replaces vLLM's `RoutedExperts` layer (`PluggableLayer.register_oot`) with
`KunlunRoutedExperts`, which differs only in `_get_quant_method`, the one place the layer picks
its method. Experts that the checkpoint's compressed-tensors config quantizes as

- W8A8 int8 (int8 weights per channel, activations dynamic per token) get
  `KunlunW8A8Int8MoEMethod` (moe_w8a8.py);
- weight-only 4-bit (pack-quantized, per group or channel, with or without zero points) get
  `KunlunWNA16MoEMethod` (moe_wna16.py);

every other choice is vLLM's (the unquantized method is the plugin's already, layers/moe.py;
other quantized methods are refused by the route report, and by the start-up check of the
checkpoint's quantization_config before that).
"""

from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
    CompressedTensorsConfig,
)

from vllm_kunlun.quantization.moe_w8a8 import KunlunW8A8Int8MoEMethod
from vllm_kunlun.quantization.moe_wna16 import KunlunWNA16MoEMethod


def experts_scheme(quant_config, layer, prefix: str) -> dict | None:
    """The compressed-tensors scheme (weights and input_activations QuantizationArgs) of this
    experts layer, or None when the config is not compressed-tensors or ignores the experts."""
    if not isinstance(quant_config, CompressedTensorsConfig):
        return None
    names = [f"{prefix}.0.{name}" for name in (layer.ckpt_gate_proj_name, layer.ckpt_up_proj_name,
                                               layer.ckpt_down_proj_name) if name]  # fmt: skip
    if _ignored(quant_config, names):
        return None
    # A target naming the projections, or else "Linear": the experts were Linear layers (what
    # vLLM's own MoE method lookup assumes).
    scheme = quant_config.get_scheme_dict(layer, names[0])
    if scheme is None:
        scheme = quant_config.target_scheme_map.get("Linear")
    return scheme


def is_w8a8_int8(weights, acts) -> bool:
    """int8 symmetric weights per channel, int8 symmetric activations dynamic per token."""
    return (
        weights is not None and acts is not None
        and weights.type == "int" and weights.num_bits == 8 and weights.symmetric
        and weights.strategy == "channel"
        and acts.type == "int" and acts.num_bits == 8 and acts.symmetric
        and acts.dynamic and acts.strategy == "token"
    )  # fmt: skip


def is_int4_weight_only(weights, acts) -> bool:
    """4-bit int weights per group or channel (zero points or not), activations unquantized."""
    return (
        weights is not None and acts is None
        and weights.type == "int" and weights.num_bits == 4
        and weights.strategy in ("group", "channel")
    )  # fmt: skip


def _ignored(quant_config: CompressedTensorsConfig, names: list[str]) -> bool:
    from vllm.model_executor.layers.quantization.compressed_tensors.utils import (
        should_ignore_layer,
    )

    return all(
        should_ignore_layer(name, ignore=quant_config.ignore,
                            fused_mapping=quant_config.packed_modules_mapping)
        for name in names
    )  # fmt: skip


class KunlunRoutedExperts(RoutedExperts):
    """vLLM's RoutedExperts, choosing the plugin's quantized MoE methods where vLLM's own would
    need its MoE backend oracles (no out-of-tree entry)."""

    def _get_quant_method(self, prefix: str, quant_config, moe_config: FusedMoEConfig):
        scheme = experts_scheme(quant_config, self, prefix)
        if scheme is not None:
            weights, acts = scheme.get("weights"), scheme.get("input_activations")
            if is_w8a8_int8(weights, acts):
                return KunlunW8A8Int8MoEMethod(weights, acts, moe_config)
            if is_int4_weight_only(weights, acts):
                return KunlunWNA16MoEMethod(weights, acts, moe_config)
        return super()._get_quant_method(prefix, quant_config, moe_config)
