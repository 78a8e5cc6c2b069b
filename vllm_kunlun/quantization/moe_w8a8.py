"""W8A8 int8 MoE experts through the plugin's `moe_experts_w8a8` op (compressed-tensors W8A8 MoE).

vLLM's `CompressedTensorsW8A8Int8MoEMethod` asks vLLM's int8 MoE backend oracle for a kernel,
and that oracle has no out-of-tree entry: on a Kunlun platform it raises while the model is
built. So the plugin replaces vLLM's `RoutedExperts` layer (`PluggableLayer.register_oot`) with
`KunlunRoutedExperts`, which picks `KunlunW8A8Int8MoEMethod` for experts that the checkpoint's
compressed-tensors config quantizes as W8A8 int8 (int8 weights per channel, activations
dynamic per token), and leaves every other choice to vLLM (the unquantized method is the
plugin's already, layers/moe.py; other quantized methods are refused by the route report).

The method creates vLLM's own W8A8 MoE parameters (int8 w13 [E, 2I, H] and w2 [E, H, I], float32
scales per output channel [E, N, 1]), turns the scales into Kunlun's absmax after loading
(scale x 127, [E, N]), and runs monolithic like the unquantized method: the plugin's routing op,
then `moe_experts_w8a8`, which quantizes each expert's input and intermediate per token.
"""

import torch
from vllm.model_executor.layers.fused_moe.config import (
    FUSED_MOE_UNQUANTIZED_CONFIG,
    FusedMoEConfig,
    FusedMoEQuantConfig,
)
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
    CompressedTensorsConfig,
)
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe.compressed_tensors_moe_w8a8_int8 import (  # noqa: E501
    CompressedTensorsW8A8Int8MoEMethod,
)
from vllm.model_executor.layers.quantization.utils import replace_parameter

from vllm_kunlun.layers.moe import KunlunMonolithicMoE, refuse_eplb
from vllm_kunlun.ops import moe as moe_ops
from vllm_kunlun.quantization.int8_linear import INT8_MAX


def w8a8_expert_args(quant_config, layer, prefix: str):
    """(weights, input_activations) QuantizationArgs when compressed-tensors quantizes this
    experts layer as W8A8 int8 per channel with dynamic per-token activations, else None."""
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
    if scheme is None:
        return None
    weights, acts = scheme.get("weights"), scheme.get("input_activations")
    is_w8a8 = (
        weights is not None and acts is not None
        and weights.type == "int" and weights.num_bits == 8 and weights.symmetric
        and weights.strategy == "channel"
        and acts.type == "int" and acts.num_bits == 8 and acts.symmetric
        and acts.dynamic and acts.strategy == "token"
    )  # fmt: skip
    return (weights, acts) if is_w8a8 else None


def _ignored(quant_config: CompressedTensorsConfig, names: list[str]) -> bool:
    from vllm.model_executor.layers.quantization.compressed_tensors.utils import (
        should_ignore_layer,
    )

    return all(
        should_ignore_layer(name, ignore=quant_config.ignore,
                            fused_mapping=quant_config.packed_modules_mapping)
        for name in names
    )  # fmt: skip


class KunlunW8A8Int8MoEMethod(KunlunMonolithicMoE, CompressedTensorsW8A8Int8MoEMethod):
    """W8A8 int8 experts: the plugin's routing op, then `moe_experts_w8a8`."""

    experts_op = "moe_experts_w8a8"

    def __init__(self, weight_quant, input_quant, moe: FusedMoEConfig):
        refuse_eplb(moe)
        # vLLM's __init__ would ask its int8 MoE backend oracle, which has no out-of-tree
        # entry and raises; the parts create_weights needs are set here instead.
        FusedMoEMethodBase.__init__(self, moe)
        self.weight_quant = weight_quant
        self.input_quant = input_quant
        self.static_input_scales = False
        self.int8_backend = None
        self.experts_cls = None

    def create_weights(self, layer, *args, **kwargs) -> None:
        super().create_weights(layer, *args, **kwargs)
        self.record_layer(layer)

    def process_weights_after_loading(self, layer) -> None:
        for name in ("w13", "w2"):
            weight = getattr(layer, f"{name}_weight")
            if weight.dtype != torch.int8:
                raise ValueError(f"{name}_weight is {weight.dtype}, expected torch.int8")
            scale = getattr(layer, f"{name}_weight_scale").detach().to(torch.float32)
            absmax = (scale.reshape(weight.shape[0], weight.shape[1]) * INT8_MAX).contiguous()
            replace_parameter(layer, f"{name}_weight_scale", absmax)

    def get_fused_moe_quant_config(self, layer) -> FusedMoEQuantConfig | None:
        """No activation quantization outside the method: the experts op quantizes inside, so
        whatever vLLM moves between ranks (dispatch, combine) is unquantized."""
        return FUSED_MOE_UNQUANTIZED_CONFIG

    def apply_monolithic(
        self,
        layer,
        x: torch.Tensor,
        router_logits: torch.Tensor,
        input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        topk_weights, topk_ids = self.select_experts(layer, router_logits)
        return moe_ops.moe_experts_w8a8(
            x,
            layer.w13_weight,
            layer.w13_weight_scale,
            layer.w2_weight,
            layer.w2_weight_scale,
            topk_weights,
            topk_ids,
            layer.expert_map,
            layer.activation.value,
            layer.apply_router_weight_on_input,
        )


class KunlunRoutedExperts(RoutedExperts):
    """vLLM's RoutedExperts, choosing the plugin's W8A8 int8 MoE method where vLLM's own would
    need its int8 MoE backend oracle (no out-of-tree entry)."""

    def _get_quant_method(self, prefix: str, quant_config, moe_config: FusedMoEConfig):
        args = w8a8_expert_args(quant_config, self, prefix)
        if args is not None:
            return KunlunW8A8Int8MoEMethod(*args, moe_config)
        return super()._get_quant_method(prefix, quant_config, moe_config)
