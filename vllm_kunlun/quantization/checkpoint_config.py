"""Refusing, at start-up, quantized checkpoints the plugin has no kernels for.

vLLM learns a checkpoint's quantization from its `quantization_config` and only fails deep in a
worker (or silently picks a kernel that does not exist on a Kunlun XPU) when the platform cannot
run it. `check_quantization` reads that config in the engine process, before any worker starts,
and raises a ValueError that names the option and what is supported instead.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: The quantization methods (vLLM's names) the plugin runs, as `supported_quantization` lists
#: them. GPTQ and AWQ checkpoints reach the plugin's own configs (quantization/gptq_awq.py).
SUPPORTED_METHODS = ("compressed-tensors", "kunlun_gptq", "kunlun_awq")
#: compressed-tensors formats whose tensors the plugin's kernels read.
SUPPORTED_FORMATS = ("int-quantized", "pack-quantized")
SUPPORTED = (
    "compressed-tensors W8A8 int8 (format int-quantized: int8 symmetric weights per channel or "
    "per tensor, int8 activations dynamic per token and symmetric, or static per tensor; MoE "
    "experts per channel with dynamic activations), compressed-tensors W4A16 and W8A16 (format "
    "pack-quantized: 4-bit or 8-bit weights per group or channel; MoE experts 4-bit), and for "
    "dense models GPTQ (4-bit or 8-bit, symmetric; act-order with --tensor-parallel-size 1) and "
    "AWQ (4-bit, version gemm); make one with "
    "`vllm-kunlun quantize` (docs/quantization.md)"
)
#: GPTQ / AWQ names the checkpoint's quant_method has, by the plugin's method name.
CHECKPOINT_METHODS = {"kunlun_gptq": "gptq", "kunlun_awq": "awq"}
#: config.json keys that give an MoE model its routed experts.
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


class UnsupportedQuantization(ValueError):
    """A checkpoint or --quantization option the plugin cannot run."""


def on_kunlun_platform() -> bool:
    """Whether vLLM's current platform is one of the plugin's (the quantization kernels and
    configs act only there)."""
    from vllm.platforms import current_platform

    from vllm_kunlun.platform.base import KunlunPlatformBase

    return isinstance(current_platform, KunlunPlatformBase)


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
    """int8 weights (format int-quantized)."""
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


def _check_weight_only(group: str, spec: Mapping[str, Any], hf_config: object) -> None:
    """4-bit or 8-bit weights (4-bit for MoE experts), no activation quantization (format
    pack-quantized)."""
    weights = spec.get("weights") or {}
    bits = weights.get("num_bits")
    if weights.get("type", "int") != "int" or bits not in (4, 8):
        raise refuse(
            f"config group {group!r}: pack-quantized weights of type {weights.get('type')!r} with "
            f"{bits} bits (4-bit and 8-bit int weights are supported)"
        )
    if bits == 8 and hf_config is not None and _is_moe(hf_config):
        raise refuse(
            f"config group {group!r}: an MoE model with 8-bit weight-only experts (MoE experts "
            "run 4-bit weight-only or W8A8 int8)"
        )
    if spec.get("input_activations"):
        raise refuse(f"config group {group!r}: pack-quantized weights with quantized activations")
    if weights.get("actorder") not in (None, "static", "weight"):
        raise refuse(
            f"config group {group!r}: weights.actorder {weights.get('actorder')!r} (group "
            "activation ordering needs a g_idx the plugin's kernel does not read; use "
            "actorder static or none)"
        )
    strategy = weights.get("strategy")
    if strategy == "group":
        check_group_size(int(weights.get("group_size") or 0), hf_config, f"config group {group!r}")
    elif strategy != "channel":
        raise refuse(f"config group {group!r}: pack-quantized weights.strategy {strategy!r}")


def input_sizes(hf_config: object) -> dict[str, int]:
    """The input sizes K of a decoder's linear layers, by what they are."""
    sizes = {"hidden_size": getattr(hf_config, "hidden_size", None)}
    for key in ("intermediate_size", "moe_intermediate_size"):
        sizes[key] = getattr(hf_config, key, None)
    heads = getattr(hf_config, "num_attention_heads", None)
    head_dim = getattr(hf_config, "head_dim", None)
    if heads and head_dim:
        sizes["num_attention_heads x head_dim"] = heads * head_dim
    return {name: size for name, size in sizes.items() if isinstance(size, int) and size > 0}


def check_group_size(group_size: int, hf_config: object, where: str) -> None:
    """Every quantized layer's input size is a whole number of groups."""
    if group_size <= 0:
        raise refuse(f"{where}: group size {group_size}")
    for name, size in input_sizes(hf_config).items():
        if size % group_size:
            raise UnsupportedQuantization(
                f"vllm-kunlun cannot run this checkpoint: {where} has group size {group_size}, "
                f"but the model's {name} ({size}) is not a multiple of it; re-quantize with a "
                "group size that divides every layer's input size (vllm-kunlun quantize picks "
                "one, docs/quantization.md)."
            )


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
    moe = hf_config is not None and _is_moe(hf_config)
    for name, group in groups.items():
        if fmt == "pack-quantized":
            _check_weight_only(name, group, hf_config)
            continue
        _check_weights(name, group.get("weights"))
        _check_activations(name, group.get("input_activations"))
    if moe and fmt == "int-quantized":
        _check_moe(groups)


def check_gptq_awq(
    method: str, config: Mapping[str, Any], hf_config: object, tensor_parallel_size: int = 1
) -> None:
    """GPTQ: 4-bit, symmetric, act-order only without tensor parallelism; AWQ: 4-bit, version
    gemm; dense models, the LM head unquantized."""
    name = CHECKPOINT_METHODS[method].upper()
    bits = config.get("bits", config.get("w_bit"))
    if bits not in ((4, 8) if method == "kunlun_gptq" else (4,)):
        supported = "4-bit and 8-bit" if method == "kunlun_gptq" else "4-bit"
        raise refuse(f"{name} with {bits}-bit weights ({supported} weights are supported)")
    if hf_config is not None and _is_moe(hf_config):
        raise refuse(f"a {name} MoE model: its experts")
    if config.get("lm_head"):
        raise refuse(f"{name} with a quantized LM head (lm_head true)")
    if method == "kunlun_gptq":
        if not config.get("sym", True):
            raise refuse("GPTQ with asymmetric weights (sym false)")
        if _act_order(config) and tensor_parallel_size > 1:
            raise refuse(
                f"GPTQ with act-order (desc_act true) on --tensor-parallel-size "
                f"{tensor_parallel_size}: tensor parallelism splits the input channels of "
                "row-parallel layers across act-order's groups; serve it with "
                "--tensor-parallel-size 1, or use a checkpoint quantized with desc_act false"
            )
        if config.get("dynamic"):
            raise refuse("GPTQ with per-module `dynamic` overrides")
    else:
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise refuse(f"AWQ version {version!r} (version gemm is supported)")
    group_size = int(config.get("group_size", config.get("q_group_size", -1)))
    if group_size != -1:
        check_group_size(group_size, hf_config, f"the {name} config")


def _act_order(config: Mapping[str, Any]) -> bool:
    """GPTQ act-order that changes anything (with one group per channel it does not)."""
    return bool(config.get("desc_act")) and int(config.get("group_size", -1)) != -1


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


def _pack_group_size_and_bits(config: Mapping[str, Any]) -> tuple[int, int]:
    """The config's pack-quantized group size (-1: one group per output channel) and bits."""
    group_size, bits = -1, 4
    for group in (config.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        bits = int(weights.get("num_bits") or bits)
        if weights.get("strategy") == "group":
            group_size = int(weights.get("group_size") or -1)
    return group_size, bits


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
    method: str | None,
    config: Mapping[str, Any] | None,
    hf_config,
    model: str | None = None,
    tensor_parallel_size: int = 1,
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
    if method in CHECKPOINT_METHODS:
        check_gptq_awq(method, config, hf_config, tensor_parallel_size)
    else:
        check_compressed_tensors(config, hf_config)
    if model is None or not Path(model).is_dir():
        return
    from vllm_kunlun.quantization import checkpoint_tensors

    folder = Path(model)
    if method in CHECKPOINT_METHODS:
        group_size = int(config.get("group_size", config.get("q_group_size", -1)))
        checkpoint_tensors.check_gptq_awq_tensors(
            folder, CHECKPOINT_METHODS[method], group_size, _act_order(config),
            int(config.get("bits", config.get("w_bit", 4))),
        )  # fmt: skip
    elif config.get("format") == "pack-quantized":
        checkpoint_tensors.check_pack_quantized_tensors(folder, *_pack_group_size_and_bits(config))
    else:
        checkpoint_tensors.check_int8_tensors(folder, *_static_activations(config))
