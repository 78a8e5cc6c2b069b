"""W8A8 int8 linear layers through the plugin's `quant` ops (compressed-tensors W8A8 int8).

vLLM's compressed-tensors scheme `CompressedTensorsW8A8Int8` creates the layer's parameters
(int8 `weight` [N, K]; `weight_scale` per output channel [N, 1] or per logical width; for static
activations `input_scale` [1] and, asymmetric, `input_zero_point`) and asks vLLM's int8 kernel
list for a kernel. The list is keyed by platform and empty for an out-of-tree platform;
`register_linear_kernel(..., PlatformEnum.OOT, "int8")` puts this class there.

After loading, the scales are turned into Kunlun's absmax convention (KUNLUN.md C4: a kernel
gets max = scale x 127, not the scale): `weight_scale` then holds the per-channel absmax [N],
float32. A forward quantizes the activations (per token, or with the static per-tensor scale)
and runs the int8 GEMM, both plugin ops.
"""

from collections.abc import Sequence

import torch
from vllm.model_executor.kernels.linear import Int8ScaledMMLinearKernel
from vllm.model_executor.kernels.linear.scaled_mm.ScaledMMLinearKernel import (
    Int8ScaledMMLinearLayerConfig,
)
from vllm.model_executor.layers.quantization.utils import replace_parameter

from vllm_kunlun.ops import quant
from vllm_kunlun.quantization.checkpoint_config import on_kunlun_platform

#: int8 absmax = scale x INT8_MAX (KUNLUN.md C4).
INT8_MAX = 127.0


def per_channel(weight_scale: torch.Tensor, logical_widths: Sequence[int]) -> torch.Tensor:
    """Weight scales as one float32 value per output row [N]: per-channel scales as they are,
    per-tensor scales (one per fused part: q, k, v...) repeated over their part's rows."""
    scale = weight_scale.detach().to(torch.float32).reshape(-1)
    rows = sum(logical_widths)
    if scale.numel() == rows:
        return scale.contiguous()
    if scale.numel() != len(logical_widths):
        raise ValueError(
            f"weight_scale has {scale.numel()} values for {rows} output rows in parts of "
            f"{list(logical_widths)}: expected one per row (channel) or one per part (tensor)."
        )
    return torch.repeat_interleave(scale, torch.tensor(list(logical_widths))).contiguous()


class KunlunInt8ScaledMMLinearKernel(Int8ScaledMMLinearKernel):
    """int8 weights x int8 activations: `int8_quant_per_token` (dynamic) or `int8_quant_static`
    (static), then `int8_scaled_mm`."""

    def __init__(self, c: Int8ScaledMMLinearLayerConfig, layer_param_names: Sequence[str]) -> None:
        super().__init__(c, layer_param_names)
        static = c.is_static_input_scheme
        self.ops_used = ("int8_quant_static" if static else "int8_quant_per_token",
                         "int8_scaled_mm")  # fmt: skip

    @classmethod
    def is_supported(cls, compute_capability: int | None = None) -> tuple[bool, str | None]:
        if not on_kunlun_platform():
            return False, "needs a Kunlun platform (vllm-kunlun)"
        return True, None

    @classmethod
    def can_implement(cls, c: Int8ScaledMMLinearLayerConfig) -> tuple[bool, str | None]:
        if not c.is_static_input_scheme and not c.input_symmetric:
            return False, (
                "dynamic asymmetric activations have no plugin kernel; quantize activations "
                "symmetrically per token, or statically per tensor"
            )
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        w_name, w_scale_name, in_scale_name, in_zp_name, _ = self.layer_param_names
        weight = getattr(layer, w_name)
        if weight.dtype != torch.int8:
            raise ValueError(
                f"W8A8 int8 layer weight is {weight.dtype}, expected torch.int8: the checkpoint's "
                "weights are not int8-quantized as its quantization_config says."
            )
        absmax = per_channel(getattr(layer, w_scale_name), layer.logical_widths) * INT8_MAX
        replace_parameter(layer, w_scale_name, absmax)
        layer.kunlun_input_absmax = None
        layer.kunlun_input_zero_point = None
        if self.config.is_static_input_scheme:
            # One scale per layer (fused parts share the input, so their scales agree; vLLM's
            # own kernels take the largest too).
            scale = getattr(layer, in_scale_name).detach().to(torch.float32).max().reshape(1)
            layer.kunlun_input_scale = scale
            layer.kunlun_input_absmax = (scale * INT8_MAX).reshape(1, 1)
            if not self.config.input_symmetric:
                zero_point = getattr(layer, in_zp_name).detach().to(torch.int32).reshape(-1)[:1]
                layer.kunlun_input_zero_point = zero_point.contiguous()

    def apply_weights(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        w_name, w_scale_name, _, _, _ = self.layer_param_names
        weight, weight_absmax = getattr(layer, w_name), getattr(layer, w_scale_name)
        rows = x.reshape(-1, x.shape[-1])
        zero_point = layer.kunlun_input_zero_point
        if self.config.is_static_input_scheme:
            x_q = quant.int8_quant_static(rows, layer.kunlun_input_scale, zero_point)
            x_absmax = layer.kunlun_input_absmax
        else:
            x_q, x_absmax = quant.int8_quant_per_token(rows)
        out = quant.int8_scaled_mm(x_q, x_absmax, weight, weight_absmax, zero_point, bias, x.dtype)
        return out.view(*x.shape[:-1], weight.shape[0])
