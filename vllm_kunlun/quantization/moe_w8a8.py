"""W8A8 int8 MoE experts through the plugin's `moe_experts_w8a8` op (compressed-tensors W8A8 MoE).

vLLM's `CompressedTensorsW8A8Int8MoEMethod` asks vLLM's int8 MoE backend oracle for a kernel,
and that oracle has no out-of-tree entry: on a Kunlun platform it raises while the model is
built. The plugin's experts layer (quantization/routed_experts.py) picks
`KunlunW8A8Int8MoEMethod` instead for experts that the checkpoint's compressed-tensors config
quantizes as W8A8 int8 (int8 weights per channel, activations dynamic per token).

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
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe.compressed_tensors_moe_w8a8_int8 import (  # noqa: E501
    CompressedTensorsW8A8Int8MoEMethod,
)
from vllm.model_executor.layers.quantization.utils import replace_parameter

from vllm_kunlun.layers.moe import KunlunMonolithicMoE, refuse_eplb
from vllm_kunlun.ops import moe as moe_ops
from vllm_kunlun.quantization.int8_linear import INT8_MAX


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
