"""Quantized checkpoints through the plugin's `quant` ops.

- `int8_linear`: compressed-tensors W8A8 int8 linear layers (vLLM's int8 kernel list, OOT).
- `wna16_linear`: weight-only 4-bit linear layers (vLLM's mixed-precision kernel list, OOT):
  compressed-tensors W4A16, and GPTQ / AWQ through `gptq_awq`'s configs.
- `routed_experts`: vLLM's RoutedExperts, replaced by the plugin's, which picks the plugin's
  quantized MoE methods: `moe_w8a8` (compressed-tensors W8A8 int8 experts) and `moe_wna16`
  (compressed-tensors weight-only 4-bit experts).
- `checkpoint_config`: refusing at start-up what the plugin cannot run, naming the option.

`register_quantization` runs in every process (vllm_kunlun.register_ops).
"""

from vllm_kunlun.quantization.checkpoint_config import SUPPORTED_METHODS, check_quantization

#: Plugin linear kernels, by vLLM's kernel-list name (register_linear_kernel's kernel_type).
_registered = False


def linear_kernels() -> dict[str, list[type]]:
    from vllm_kunlun.quantization.int8_linear import KunlunInt8ScaledMMLinearKernel
    from vllm_kunlun.quantization.wna16_linear import KunlunWNA16LinearKernel

    return {"int8": [KunlunInt8ScaledMMLinearKernel], "mp": [KunlunWNA16LinearKernel]}


def register_quantization() -> None:
    """Put the plugin's quantized linear kernels in vLLM's kernel lists for out-of-tree
    platforms, its GPTQ / AWQ configs in vLLM's quantization registry, and its experts layer in
    place of vLLM's (idempotent)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.kernels.linear import register_linear_kernel
    from vllm.platforms import PlatformEnum

    for kind, kernels in linear_kernels().items():
        for kernel in kernels:
            register_linear_kernel(kernel, PlatformEnum.OOT, kind)
    register_gptq_awq()
    register_routed_experts()
    _registered = True


def register_gptq_awq() -> None:
    """The plugin's GPTQ and AWQ configs under their own names (they claim GPTQ / AWQ
    checkpoints on a Kunlun platform only; safe to call more than once)."""
    from vllm.model_executor.layers.quantization import (
        QUANTIZATION_METHODS,
        register_quantization_config,
    )

    from vllm_kunlun.quantization.gptq_awq import CONFIGS

    for name, config in CONFIGS.items():
        if name not in QUANTIZATION_METHODS:
            register_quantization_config(name)(config)


def register_routed_experts() -> None:
    """vLLM's RoutedExperts layer replaced by the plugin's, which picks the plugin's quantized
    MoE methods (safe to call more than once)."""
    from vllm.model_executor.custom_op import PluggableLayer, op_registry_oot

    from vllm_kunlun.quantization.routed_experts import KunlunRoutedExperts

    if op_registry_oot.get("RoutedExperts") is not KunlunRoutedExperts:
        PluggableLayer.register_oot(_decorated_layer_cls=KunlunRoutedExperts, name="RoutedExperts")


def plugin_linear_kernel(layer) -> object | None:
    """The plugin kernel a quantized linear layer runs, if any (compressed-tensors keeps its
    scheme on the layer and the scheme keeps the kernel; GPTQ / AWQ keep it on the method)."""
    plugin_kernels = tuple(kernel for kernels in linear_kernels().values() for kernel in kernels)
    holder = getattr(layer, "scheme", None) or getattr(layer, "quant_method", None)
    kernel = getattr(holder, "kernel", None)
    return kernel if isinstance(kernel, plugin_kernels) else None


__all__ = ["SUPPORTED_METHODS", "check_quantization", "plugin_linear_kernel",
           "register_quantization"]  # fmt: skip
