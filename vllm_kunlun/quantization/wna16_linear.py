"""Weight-only 4-bit and 8-bit linear layers (wNa16, W8A16) through the plugin's `quant` ops.

vLLM's weight-only methods (compressed-tensors `pack-quantized`, GPTQ, AWQ) create the layer's
parameters in their checkpoint's layout and ask vLLM's mixed-precision kernel list for a
kernel; `register_linear_kernel(..., PlatformEnum.OOT, "mp")` puts this class there. Every
method hands over the same description: a weight packed eight values to an int32 along the
input dimension K (`input_dim` / `packed_dim` say which tensor axis that is: GPTQ [K / 8, N],
compressed-tensors [N, K / 8]; AWQ is converted to it by vLLM's AWQ method), group scales
(`output_dim` says whether they are [G, N] or [N, G]), and for asymmetric types (`uint4`)
zero points packed along N. Symmetric types (`uint4b8`: value + 8) have the implicit zero
point 8. 8-bit weights (GPTQ 8-bit `uint8b128`, compressed-tensors 8-bit `uint8`) arrive the
same way, four values to a word.

After loading, the weight, scales and zero points are rewritten once into the `quant` family's
layout (vllm_kunlun/ops/quant/int4_layout.py: int32 [K, N / 8] packed along N, scales [G, N],
zero points always present), which is what Kunlun's awq_gemm reads as it is. A forward is one
plugin op, `wna16_gemm`. 8-bit weights are kept as unsigned bytes [K, N] with uint8 zero points
[G, N] (128 for symmetric types), and a forward is `w8a16_gemm`.

GPTQ act-order: the plugin's GPTQ method adds `g_idx` [K] (gptq_awq.py), each input channel's
group, in any order. The weight's rows are then sorted by group (stably), which makes every
group the contiguous K / G rows the layout needs (checked: a g_idx that does not give each
group exactly K / G channels, in group order, is refused), and the sort is kept as
`wna16_gemm`'s input_order: x' = x[..., order], so x' @ W_sorted = x @ W.
"""

import torch
from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import (
    MPLinearKernel,
    MPLinearLayerConfig,
)
from vllm.model_executor.layers.quantization.utils import replace_parameter
from vllm.model_executor.layers.quantization.utils.quant_utils import (
    unpack_quantized_values_into_int32,
)
from vllm.scalar_type import scalar_types

from vllm_kunlun.ops import quant
from vllm_kunlun.ops.quant.int4_layout import PACK, pack_int4
from vllm_kunlun.quantization.checkpoint_config import on_kunlun_platform

#: Weight types with a plugin kernel: 4-bit and 8-bit, with an implicit zero point (8, 128) or with
#: zero points.
SUPPORTED_TYPES = (scalar_types.uint4b8, scalar_types.uint4, scalar_types.uint8b128,
                   scalar_types.uint8)  # fmt: skip
ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ZEROS_NAME = "kunlun_w4_zeros"
#: GPTQ act-order's group of each input channel (as loaded), and the sort kept from it.
GROUP_INDEX_NAME = "g_idx"
INPUT_ORDER_NAME = "kunlun_w4_input_order"


def _input_major(tensor: torch.Tensor, input_axis: int | None) -> torch.Tensor:
    """[K-ish, N] whichever axis the checkpoint's method put K (or the groups) on."""
    return tensor.t() if input_axis == 1 else tensor


class KunlunWNA16LinearKernel(MPLinearKernel):
    """int4 weights, float activations: `wna16_gemm`; int8 weights: `w8a16_gemm`."""

    @property
    def ops_used(self) -> tuple[str, ...]:
        """The plugin op a forward runs, for the route report."""
        return ("w8a16_gemm",) if self._eight_bit else ("wna16_gemm",)

    @property
    def _eight_bit(self) -> bool:
        return self.config.weight_type.size_bits == 8

    @classmethod
    def get_min_capability(cls) -> int:
        return -1  # the plugin platform reports no capability

    @classmethod
    def can_implement(cls, c: MPLinearLayerConfig) -> tuple[bool, str | None]:
        if not on_kunlun_platform():
            return False, "needs a Kunlun platform (vllm-kunlun)"
        if c.weight_type not in SUPPORTED_TYPES:
            return False, (
                f"weight type {c.weight_type} (4-bit and 8-bit weights only: uint4b8, uint4, "
                "uint8b128, uint8)"
            )
        if c.act_type not in ACT_DTYPES:
            return False, f"activation dtype {c.act_type}"
        depth, channels = c.partition_weight_shape
        if c.weight_type.size_bits == 4 and channels % PACK:
            return False, f"{channels} output channels per partition: not a multiple of {PACK}"
        if c.group_size not in (-1, 0) and depth % c.group_size:
            return False, (
                f"the input size per partition ({depth}) is not a multiple of the group size "
                f"({c.group_size})"
            )
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        weight, scales, zeros = self._get_weight_params(layer)
        values = unpack_quantized_values_into_int32(
            weight.data, self.config.weight_type, weight.packed_dim
        )
        values = _input_major(values, weight.input_dim)  # [K, N] unsigned 4-bit values
        scales_kn = _input_major(scales.data, 1 - scales.output_dim).contiguous()  # [G, N]
        if self.config.zero_points:
            assert zeros is not None
            zero_values = unpack_quantized_values_into_int32(
                zeros.data, self.config.weight_type, zeros.packed_dim
            )
            zero_values = _input_major(zero_values, 1 - zeros.output_dim)
        else:
            bias = self.config.weight_type.bias  # uint4b8 / uint8b128: stored q + 8 / q + 128
            zero_values = torch.full_like(scales_kn, bias, dtype=torch.int32)
        groups, depth = scales_kn.shape[0], values.shape[0]
        if depth % groups:
            raise ValueError(
                f"a weight-only layer's input size {depth} is not a multiple of its {groups} "
                "quantization groups"
            )
        group_index = getattr(layer, GROUP_INDEX_NAME, None)
        if group_index is not None:
            order = _group_order(group_index.data, groups)
            values = values[order]
            delattr(layer, GROUP_INDEX_NAME)
            layer.register_parameter(
                INPUT_ORDER_NAME, torch.nn.Parameter(order, requires_grad=False)
            )
        store = _as_bytes if self._eight_bit else pack_int4
        replace_parameter(layer, self.w_q_name, store(values).contiguous())
        replace_parameter(layer, self.w_s_name, scales_kn.to(self.config.act_type))
        if self.w_zp_name is not None and hasattr(layer, self.w_zp_name):
            delattr(layer, self.w_zp_name)
        layer.register_parameter(
            ZEROS_NAME, torch.nn.Parameter(store(zero_values).contiguous(), requires_grad=False)
        )

    def apply_weights(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        weight, scales = getattr(layer, self.w_q_name), getattr(layer, self.w_s_name)
        order = getattr(layer, INPUT_ORDER_NAME, None)
        gemm = quant.w8a16_gemm if self._eight_bit else quant.wna16_gemm
        return gemm(x, weight, scales, getattr(layer, ZEROS_NAME), order, bias)


def _as_bytes(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 8-bit values (int32, 0..255) as uint8: the W8A16 op's layout."""
    return values.to(torch.uint8)


def _group_order(group_index: torch.Tensor, groups: int) -> torch.Tensor:
    """The stable sort of the input channels by group (int64 [K]), after checking that it gives
    each of the `groups` groups exactly K / G channels, in group order."""
    depth = group_index.shape[0]
    order = torch.argsort(group_index.long(), stable=True)
    expected = torch.arange(groups, device=group_index.device).repeat_interleave(depth // groups)
    if not torch.equal(group_index.long()[order], expected):
        raise ValueError(
            f"GPTQ act-order: g_idx does not give each of the {groups} groups exactly "
            f"{depth // groups} of the {depth} input channels; the checkpoint is corrupt or "
            "was not written by GPTQ"
        )
    return order
