"""Refusing, before any worker starts, the quantized checkpoints the plugin has no kernels for
(vllm_kunlun.quantization.checkpoint_config), and accepting the ones it runs. No engine: the
engine-level refusals are in tests/test_quantized_models.py."""

import copy
import types

import pytest
import torch

from vllm_kunlun.quantization.checkpoint_config import (
    UnsupportedQuantization,
    check_method,
    check_quantization,
)

WEIGHTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
           "dynamic": False}  # fmt: skip
DYNAMIC = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
STATIC = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}
DENSE = types.SimpleNamespace(model_type="llama")
CT = "compressed-tensors"


def config(weights=WEIGHTS, acts=DYNAMIC, **extra) -> dict:
    group = {"targets": ["Linear"], "weights": dict(weights)}
    if acts is not None:
        group["input_activations"] = dict(acts)
    return {"quant_method": "compressed-tensors", "format": "int-quantized",
            "config_groups": {"group_0": group}, "ignore": ["lm_head"]} | extra  # fmt: skip


def refusal(method, quant_config, hf_config=DENSE) -> str:
    with pytest.raises(UnsupportedQuantization) as error:
        check_quantization(method, quant_config, hf_config)
    return str(error.value)


@pytest.mark.parametrize(
    "quant_config",
    [
        config(),
        config(acts=STATIC),
        config(acts=STATIC | {"symmetric": False}),
        config(weights=WEIGHTS | {"strategy": "tensor"}, acts=STATIC),
    ],
    ids=["dynamic per token", "static", "static asymmetric", "per-tensor weights"],
)
def test_w8a8_int8_checkpoints_are_accepted(quant_config):
    check_quantization("compressed-tensors", quant_config, DENSE)


def test_unquantized_models_need_no_check():
    check_quantization(None, None, DENSE)


@pytest.mark.parametrize(
    ("method", "quant_config", "names"),
    [
        ("fp8", None, "--quantization fp8"),
        ("gguf", None, "--quantization gguf"),
        ("gptq", {"quant_method": "gptq", "bits": 4}, "--quantization gptq"),
        (CT, None, "without a quantization_config"),
        (CT, config(format="float-quantized"), "format 'float-quantized'"),
        (CT, config(format="pack-quantized"), "format 'pack-quantized'"),
        (CT, config(weights=WEIGHTS | {"type": "float"}), "weights of type 'float'"),
        (CT, config(weights=WEIGHTS | {"num_bits": 4}), "with 4 bits"),
        (CT, config(weights=WEIGHTS | {"symmetric": False}), "asymmetric int8 weights"),
        (CT, config(weights=WEIGHTS | {"strategy": "group", "group_size": 128}),
         "weights.strategy 'group'"),
        (CT, config(acts=None), "weight-only int8"),
        (CT, config(acts=DYNAMIC | {"symmetric": False}), "dynamic activations"),
        (CT, config(acts=STATIC | {"strategy": "channel"}), "static activations"),
        (CT, config(acts=DYNAMIC | {"type": "float"}), "input_activations of type"),
        (CT, config(kv_cache_scheme={"num_bits": 8, "type": "int"}), "kv_cache_scheme"),
        (CT, config(sparsity_config={"format": "sparse-24"}), "sparsity_config"),
        (CT, config(config_groups={}), "without config_groups"),
    ],
)  # fmt: skip
def test_what_the_plugin_cannot_run_is_refused_naming_the_option(method, quant_config, names):
    message = refusal(method, quant_config)
    assert names in message
    assert "Supported: compressed-tensors W8A8 int8" in message or "supports:" in message
    assert "vllm-kunlun quantize" in message


def test_a_quantized_moe_model_needs_per_channel_weights_and_dynamic_activations():
    moe = types.SimpleNamespace(model_type="qwen3_moe", num_experts=8)
    check_quantization(CT, config(), moe)
    assert "quantized MoE model whose config group 'group_0'" in refusal(
        CT, config(acts=STATIC), moe
    )
    per_tensor = config(weights=WEIGHTS | {"strategy": "tensor"})
    assert "weights per tensor and dynamic activations" in refusal(CT, per_tensor, moe)


def test_the_config_is_not_modified():
    quant_config = config(acts=STATIC)
    before = copy.deepcopy(quant_config)
    check_quantization("compressed-tensors", quant_config, DENSE)
    assert quant_config == before


def test_the_platform_refuses_other_methods_by_name():
    from vllm_kunlun.platform.base import KunlunPlatformBase

    assert KunlunPlatformBase.supported_quantization == ["compressed-tensors"]
    KunlunPlatformBase.verify_quantization("compressed-tensors")
    with pytest.raises(ValueError, match="cannot run --quantization awq"):
        KunlunPlatformBase.verify_quantization("awq")
    with pytest.raises(ValueError, match="serve an unquantized checkpoint"):
        check_method("fp8")


# The checkpoint's tensors, read from the safetensors headers -------------------------------

LAYER = "model.layers.0.self_attn.q_proj"


def write_checkpoint(folder, *, drop=(), replace=None, static=False, asymmetric=False):
    from safetensors.torch import save_file

    tensors = {
        f"{LAYER}.weight": torch.zeros(8, 16, dtype=torch.int8),
        f"{LAYER}.weight_scale": torch.ones(8, 1),
        "model.embed_tokens.weight": torch.zeros(32, 16),
        "lm_head.weight": torch.zeros(32, 16),
    }
    if static:
        tensors[f"{LAYER}.input_scale"] = torch.ones(1)
    if asymmetric:
        tensors[f"{LAYER}.input_zero_point"] = torch.zeros(1, dtype=torch.int8)
    tensors |= replace or {}
    for name in drop:
        del tensors[name]
    save_file(tensors, str(folder / "model.safetensors"))
    return str(folder)


def test_a_complete_checkpoint_passes(tmp_path):
    model = write_checkpoint(tmp_path, static=True, asymmetric=True)
    check_quantization(CT, config(acts=STATIC | {"symmetric": False}), DENSE, model)


@pytest.mark.parametrize(
    ("drop", "replace", "acts", "says"),
    [
        ((f"{LAYER}.weight_scale",), None, DYNAMIC,
         f"{LAYER}.weight_scale (the weight's scale) is missing"),
        ((), {f"{LAYER}.weight": torch.zeros(8, 16)}, DYNAMIC,
         f"{LAYER}.weight is F32 [8, 16], expected int8 (I8) [N, K]"),
        ((), {f"{LAYER}.weight_scale": torch.ones(3)}, DYNAMIC,
         f"{LAYER}.weight_scale is F32 [3]; expected a float scale per output row ([8, 1])"),
        ((f"{LAYER}.input_scale",), None, STATIC, f"{LAYER}.input_scale is missing"),
        ((f"{LAYER}.input_zero_point",), None, STATIC | {"symmetric": False},
         f"{LAYER}.input_zero_point is missing"),
        ((f"{LAYER}.weight_scale", f"{LAYER}.weight"), None, DYNAMIC,
         "no tensor is int8-quantized"),
    ],
    ids=["missing scale", "float weight", "scale shape", "missing input scale",
         "missing zero point", "nothing quantized"],
)  # fmt: skip
def test_a_checkpoint_that_does_not_match_its_config_is_refused_naming_the_tensor(
    tmp_path, drop, replace, acts, says
):
    model = write_checkpoint(tmp_path, drop=drop, replace=replace, static=True, asymmetric=True)
    with pytest.raises(UnsupportedQuantization) as error:
        check_quantization(CT, config(acts=acts), DENSE, model)
    message = str(error.value)
    assert says in message and "does not match its quantization_config" in message
