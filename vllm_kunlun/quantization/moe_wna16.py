"""Weight-only 4-bit MoE experts through the plugin's `moe_experts_wna16` op (compressed-tensors
W4A16 MoE, format pack-quantized).

vLLM's `CompressedTensorsWNA16MoEMethod` asks vLLM's wNa16 MoE backend oracle for a kernel, and
that oracle has no out-of-tree entry. The plugin's experts layer (routed_experts.py) picks
`KunlunWNA16MoEMethod` instead. It creates vLLM's own parameters in the checkpoint's layout
(vLLM's loader fills them, tensor-parallel shards included):

- w13_weight_packed int32 [E, 2I, H / 8] and w2_weight_packed [E, H, I / 8], packed eight values
  to a word along the input dimension, stored as q + 8 (symmetric) or q;
- w13_weight_scale [E, 2I, G13] and w2_weight_scale [E, H, G2] (G = 1 per channel);
- for asymmetric weights, w13_weight_zero_point int32 [E, 2I / 8, G13] and w2's, packed along
  the output channels.

After loading, each expert is rewritten once into the quant family's layout (int4_layout.py,
input dimension first): packed [E, K, N / 8], scales [E, G, N] and zero points [E, G, N / 8],
always present (8 for symmetric weights). A forward is the plugin's routing op, then
`moe_experts_wna16`.
"""

import torch
from vllm.model_executor.layers.fused_moe.config import (
    FUSED_MOE_UNQUANTIZED_CONFIG,
    FusedMoEConfig,
    FusedMoEQuantConfig,
)
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe.compressed_tensors_moe_wna16 import (  # noqa: E501
    CompressedTensorsWNA16MoEMethod,
)
from vllm.model_executor.layers.quantization.utils import replace_parameter
from vllm.model_executor.layers.quantization.utils.quant_utils import (
    unpack_quantized_values_into_int32,
)
from vllm.scalar_type import ScalarType, scalar_types

from vllm_kunlun.layers.moe import KunlunMonolithicMoE, refuse_eplb
from vllm_kunlun.ops import moe as moe_ops
from vllm_kunlun.ops.quant.int4_layout import pack_int4


def expert_to_kunlun_layout(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    weight_type: ScalarType,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One expert's checkpoint tensors (packed [N, K / 8] along K, scales [N, G], zero points
    [N / 8, G] along N or None) -> (packed int32 [K, N / 8], scales [G, N], zeros int32
    [G, N / 8]) in int4_layout.py's layout, zero points unsigned (the type's bias, 8, when
    symmetric)."""
    values = unpack_quantized_values_into_int32(packed, weight_type, packed_dim=1)  # [N, K]
    if zero_points is None:
        zeros = torch.full(scales.shape, weight_type.bias, dtype=torch.int32,
                           device=scales.device)  # fmt: skip
    else:
        zeros = unpack_quantized_values_into_int32(zero_points, weight_type, packed_dim=0)
    return (
        pack_int4(values.t()).contiguous(),
        scales.t().contiguous(),
        pack_int4(zeros.t()).contiguous(),
    )


class KunlunWNA16MoEMethod(KunlunMonolithicMoE, CompressedTensorsWNA16MoEMethod):
    """Weight-only 4-bit experts: the plugin's routing op, then `moe_experts_wna16`."""

    experts_op = "moe_experts_wna16"

    def __init__(self, weight_quant, input_quant, moe: FusedMoEConfig):
        refuse_eplb(moe)
        # vLLM's __init__ would ask its wNa16 MoE backend oracle, which has no out-of-tree
        # entry and raises; the parts create_weights needs are set here instead.
        FusedMoEMethodBase.__init__(self, moe)
        if weight_quant.num_bits != 4:
            raise ValueError(
                f"vllm-kunlun runs 4-bit weight-only MoE experts, not {weight_quant.num_bits}-bit"
            )
        self.weight_quant = weight_quant
        self.input_quant = input_quant
        self.symmetric = weight_quant.symmetric
        self.num_bits = weight_quant.num_bits
        self.packed_factor = 32 // weight_quant.num_bits
        self.strategy = weight_quant.strategy
        self.group_size = -1 if weight_quant.group_size is None else weight_quant.group_size
        self.quant_type = scalar_types.uint4b8 if self.symmetric else scalar_types.uint4
        self.wna16_backend = None
        self.experts_cls = None
        self.is_marlin = False
        self.is_transposed = False

    def process_weights_after_loading(self, layer) -> None:
        for name in ("w13", "w2"):
            packed = getattr(layer, f"{name}_weight_packed")
            scales = getattr(layer, f"{name}_weight_scale")
            zero_points = getattr(layer, f"{name}_weight_zero_point", None)
            if packed.dtype != torch.int32:
                raise ValueError(f"{name}_weight_packed is {packed.dtype}, expected torch.int32")
            converted = [
                expert_to_kunlun_layout(
                    packed.data[e],
                    scales.data[e],
                    None if zero_points is None else zero_points.data[e],
                    self.quant_type,
                )
                for e in range(packed.shape[0])
            ]  # one expert at a time: the unpacked int32 values of all experts would be 8x
            new_packed, new_scales, new_zeros = (
                torch.stack(parts) for parts in zip(*converted, strict=True)
            )
            replace_parameter(layer, f"{name}_weight_packed", new_packed)
            replace_parameter(layer, f"{name}_weight_scale", new_scales)
            if zero_points is None:
                layer.register_parameter(
                    f"{name}_weight_zero_point",
                    torch.nn.Parameter(new_zeros, requires_grad=False),
                )
            else:
                replace_parameter(layer, f"{name}_weight_zero_point", new_zeros)

    def get_fused_moe_quant_config(self, layer) -> FusedMoEQuantConfig | None:
        """Activations stay unquantized: whatever vLLM moves between ranks is float."""
        return FUSED_MOE_UNQUANTIZED_CONFIG

    def apply_monolithic(
        self,
        layer,
        x: torch.Tensor,
        router_logits: torch.Tensor,
        input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        topk_weights, topk_ids = self.select_experts(layer, router_logits)
        return moe_ops.moe_experts_wna16(
            x,
            layer.w13_weight_packed,
            layer.w13_weight_scale,
            layer.w13_weight_zero_point,
            layer.w2_weight_packed,
            layer.w2_weight_scale,
            layer.w2_weight_zero_point,
            topk_weights,
            topk_ids,
            layer.expert_map,
            layer.activation.value,
            layer.apply_router_weight_on_input,
        )
