"""Quantized checkpoints through the plugin's `quant` ops.

- `int8_linear`: compressed-tensors W8A8 int8 linear layers (vLLM's int8 kernel list, OOT).
- `moe_w8a8`: compressed-tensors W8A8 int8 MoE experts (vLLM's RoutedExperts, replaced).
- `checkpoint_config`: refusing at start-up what the plugin cannot run, naming the option.

`register_quantization` runs in every process (vllm_kunlun.register_ops).
"""

from vllm_kunlun.quantization.checkpoint_config import SUPPORTED_METHODS, check_quantization

#: Plugin linear kernels, by vLLM's kernel-list name (register_linear_kernel's kernel_type).
_registered = False


def linear_kernels() -> dict[str, list[type]]:
    from vllm_kunlun.quantization.int8_linear import KunlunInt8ScaledMMLinearKernel

    return {"int8": [KunlunInt8ScaledMMLinearKernel]}


def register_quantization() -> None:
    """Put the plugin's quantized linear kernels in vLLM's kernel lists for out-of-tree
    platforms, and its experts layer in place of vLLM's (idempotent)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.kernels.linear import register_linear_kernel
    from vllm.platforms import PlatformEnum

    for kind, kernels in linear_kernels().items():
        for kernel in kernels:
            register_linear_kernel(kernel, PlatformEnum.OOT, kind)
    register_routed_experts()
    _registered = True


def register_routed_experts() -> None:
    """vLLM's RoutedExperts layer replaced by the plugin's, which picks the plugin's W8A8 MoE
    method (safe to call more than once)."""
    from vllm.model_executor.custom_op import PluggableLayer, op_registry_oot

    from vllm_kunlun.quantization.moe_w8a8 import KunlunRoutedExperts

    if op_registry_oot.get("RoutedExperts") is not KunlunRoutedExperts:
        PluggableLayer.register_oot(_decorated_layer_cls=KunlunRoutedExperts, name="RoutedExperts")


def plugin_linear_kernel(layer) -> object | None:
    """The plugin kernel a quantized linear layer runs, if any (compressed-tensors keeps its
    scheme on the layer and the scheme keeps the kernel)."""
    from vllm_kunlun.quantization.int8_linear import KunlunInt8ScaledMMLinearKernel

    kernel = getattr(getattr(layer, "scheme", None), "kernel", None)
    return kernel if isinstance(kernel, KunlunInt8ScaledMMLinearKernel) else None


__all__ = ["SUPPORTED_METHODS", "check_quantization", "plugin_linear_kernel",
           "register_quantization"]  # fmt: skip
