"""Refusing, at start-up, quantized checkpoints the plugin has no kernels for.

vLLM learns a checkpoint's quantization from its `quantization_config` and only fails deep in a
worker (or silently picks a kernel that does not exist on a Kunlun XPU) when the platform cannot
run it. `check_quantization` reads that config in the engine process, before any worker starts,
and raises a ValueError that names the option and what is supported instead.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: The quantization methods (vLLM's names) the plugin runs, as `supported_quantization` lists them.
SUPPORTED_METHODS = ("compressed-tensors",)
#: compressed-tensors formats whose tensors the plugin's kernels read.
SUPPORTED_FORMATS = ("int-quantized",)
SUPPORTED = (
    "compressed-tensors W8A8 int8 (format int-quantized: int8 symmetric weights per channel or "
    "per tensor, int8 activations dynamic per token and symmetric, or static per tensor; MoE "
    "experts per channel with dynamic activations); make one with `vllm-kunlun quantize` "
    "(docs/quantization.md)"
)
#: config.json keys that give an MoE model its routed experts.
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


class UnsupportedQuantization(ValueError):
    """A checkpoint or --quantization option the plugin cannot run."""


def refuse(what: str) -> UnsupportedQuantization:
    return UnsupportedQuantization(f"vllm-kunlun cannot run {what}. Supported: {SUPPORTED}.")


def check_method(method: str) -> None:
    if method not in SUPPORTED_METHODS:
        raise UnsupportedQuantization(
            f"vllm-kunlun cannot run --quantization {method} (or a checkpoint whose "
            f"quantization_config says {method!r}): serve an unquantized checkpoint in bfloat16 "
            f"or float16 instead, or a quantized one the plugin supports: {SUPPORTED}."
        )


def _check_weights(group: str, weights: Mapping[str, Any] | None) -> None:
    if not weights:
        raise refuse(f"config group {group!r} without `weights` quantization")
    if weights.get("type", "int") != "int" or weights.get("num_bits") != 8:
        raise refuse(
            f"config group {group!r} weights of type {weights.get('type')!r} with "
            f"{weights.get('num_bits')} bits (only int8 weights have a plugin kernel yet)"
        )
    if not weights.get("symmetric", True):
        raise refuse(f"config group {group!r}: asymmetric int8 weights (weights.symmetric false)")
    if weights.get("strategy") not in ("channel", "tensor"):
        raise refuse(
            f"config group {group!r}: weights.strategy {weights.get('strategy')!r} "
            "(channel or tensor are supported)"
        )


def _check_activations(group: str, acts: Mapping[str, Any] | None) -> None:
    if not acts:
        raise refuse(f"config group {group!r}: weight-only int8 (no input_activations)")
    if acts.get("type", "int") != "int" or acts.get("num_bits") != 8:
        raise refuse(
            f"config group {group!r}: input_activations of type {acts.get('type')!r} with "
            f"{acts.get('num_bits')} bits (int8 is supported)"
        )
    strategy, symmetric = acts.get("strategy"), acts.get("symmetric", True)
    if acts.get("dynamic"):
        if strategy != "token" or not symmetric:
            raise refuse(
                f"config group {group!r}: dynamic activations with strategy {strategy!r}, "
                f"symmetric {symmetric} (dynamic activations must be per token and symmetric)"
            )
    elif strategy != "tensor":
        raise refuse(
            f"config group {group!r}: static activations with strategy {strategy!r} "
            "(static activations must be per tensor)"
        )


def _is_moe(hf_config: object) -> bool:
    return any(getattr(hf_config, key, None) for key in MOE_KEYS)


def check_compressed_tensors(config: Mapping[str, Any], hf_config: object = None) -> None:
    """Refuse a compressed-tensors quantization_config the plugin's kernels cannot run."""
    fmt = config.get("format")
    if fmt not in SUPPORTED_FORMATS:
        raise refuse(f"compressed-tensors format {fmt!r}")
    for key in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if config.get(key):
            raise refuse(f"a compressed-tensors checkpoint with {key} set")
    groups = config.get("config_groups") or {}
    if not groups:
        raise refuse("a compressed-tensors quantization_config without config_groups")
    for name, group in groups.items():
        _check_weights(name, group.get("weights"))
        _check_activations(name, group.get("input_activations"))
    if hf_config is not None and _is_moe(hf_config):
        _check_moe(groups)


def _check_moe(groups: Mapping[str, Any]) -> None:
    """Quantized experts run as W8A8 with per-channel weights and dynamic per-token
    activations only (the compressed-tensors W8A8 MoE format vLLM defines)."""
    for name, group in groups.items():
        weights, acts = group.get("weights") or {}, group.get("input_activations") or {}
        if weights.get("strategy") != "channel" or not acts.get("dynamic"):
            raise refuse(
                f"a quantized MoE model whose config group {name!r} has weights per "
                f"{weights.get('strategy')} and {'dynamic' if acts.get('dynamic') else 'static'} "
                "activations (quantized MoE experts need int8 weights per channel and dynamic "
                "per-token activations)"
            )


def _static_activations(config: Mapping[str, Any]) -> tuple[bool, bool]:
    """(some group has static activations, some has static asymmetric ones)."""
    static = asymmetric = False
    for group in (config.get("config_groups") or {}).values():
        acts = group.get("input_activations") or {}
        if not acts.get("dynamic"):
            static = True
            asymmetric = asymmetric or not acts.get("symmetric", True)
    return static, asymmetric


def check_quantization(
    method: str | None, config: Mapping[str, Any] | None, hf_config, model: str | None = None
) -> None:
    """The engine's quantization method (vLLM's name, None when unquantized), the checkpoint's
    quantization_config and, when `model` is a local folder, its tensors: checked before any
    worker starts."""
    if method is None:
        return
    check_method(method)
    if config is None:
        raise refuse(
            f"--quantization {method} on a checkpoint without a quantization_config "
            "(the plugin does not quantize at load time)"
        )
    check_compressed_tensors(config, hf_config)
    if model is not None and Path(model).is_dir():
        from vllm_kunlun.quantization.checkpoint_tensors import check_int8_tensors

        check_int8_tensors(Path(model), *_static_activations(config))
