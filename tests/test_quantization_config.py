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
        (CT, config(format="marlin-24"), "format 'marlin-24'"),
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
    assert "compressed-tensors W8A8 int8 (format int-quantized" in message
    assert "vllm-kunlun quantize" in message


# Weight-only 4-bit: compressed-tensors W4A16, GPTQ, AWQ ---------------------------------------

INT4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32,
        "dynamic": False}  # fmt: skip
#: hidden 64, intermediate 96, 4 heads x 16: every input size a multiple of 32.
SMALL = types.SimpleNamespace(model_type="llama", hidden_size=64, intermediate_size=96,
                              num_attention_heads=4, head_dim=16)  # fmt: skip
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True,
        "lm_head": False}  # fmt: skip
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}


def w4a16(weights=INT4) -> dict:
    return config(weights=weights, acts=None, format="pack-quantized")


@pytest.mark.parametrize(
    ("method", "quant_config"),
    [
        (CT, w4a16()),
        (CT, w4a16(INT4 | {"symmetric": False})),
        (CT, w4a16(INT4 | {"strategy": "channel", "group_size": None})),
        ("kunlun_gptq", GPTQ),
        ("kunlun_gptq", GPTQ | {"group_size": -1}),
        ("kunlun_awq", AWQ),
        (CT, w4a16(INT4 | {"num_bits": 8})),
        ("kunlun_gptq", GPTQ | {"bits": 8}),
    ],
    ids=["w4a16", "w4a16 asymmetric", "w4a16 per channel", "gptq", "gptq per channel", "awq",
         "w8a16", "gptq 8-bit"],
)  # fmt: skip
def test_weight_only_4bit_checkpoints_are_accepted(method, quant_config):
    check_quantization(method, quant_config, SMALL)


@pytest.mark.parametrize(
    ("method", "quant_config", "says"),
    [
        (CT, w4a16(INT4 | {"num_bits": 2}), "pack-quantized weights of type 'int' with 2 bits"),
        (CT, w4a16(INT4 | {"actorder": "group"}), "weights.actorder 'group'"),
        (CT, w4a16(INT4 | {"group_size": 128}),
         "group size 128, but the model's hidden_size (64) is not a multiple of it"),
        (CT, config(acts=DYNAMIC, format="pack-quantized", weights=INT4),
         "pack-quantized weights with quantized activations"),
        ("kunlun_gptq", GPTQ | {"bits": 3}, "GPTQ with 3-bit weights"),
        ("kunlun_awq", AWQ | {"bits": 8}, "AWQ with 8-bit weights (4-bit weights are supported)"),
        ("kunlun_gptq", GPTQ | {"sym": False}, "GPTQ with asymmetric weights"),
        ("kunlun_gptq", GPTQ | {"lm_head": True}, "quantized LM head"),
        ("kunlun_gptq", GPTQ | {"group_size": 64},
         "group size 64, but the model's intermediate_size (96) is not a multiple of it"),
        ("kunlun_awq", AWQ | {"version": "gemv"}, "AWQ version 'gemv'"),
    ],
    ids=["2-bit", "group act-order", "group size", "activations", "gptq 3-bit", "awq 8-bit",
         "gptq asymmetric", "gptq lm_head", "gptq group size", "awq gemv"],
)  # fmt: skip
def test_weight_only_checkpoints_the_plugin_cannot_run_are_refused(method, quant_config, says):
    assert says in refusal(method, quant_config, SMALL)


@pytest.mark.parametrize(
    ("method", "quant_config"),
    [("kunlun_gptq", GPTQ), ("kunlun_awq", AWQ)],
    ids=["gptq", "awq"],
)
def test_gptq_and_awq_moe_models_are_refused(method, quant_config):
    moe = types.SimpleNamespace(**vars(SMALL), num_experts=8)
    assert "MoE model: its experts" in refusal(method, quant_config, moe)


def test_weight_only_moe_models_pass_the_weight_only_checks():
    """compressed-tensors W4A16 MoE runs (moe_experts_wna16); its groups are checked as a dense
    model's, the experts' input size (moe_intermediate_size) included."""
    moe = types.SimpleNamespace(**vars(SMALL), num_experts=8, moe_intermediate_size=64)
    check_quantization(CT, w4a16(), moe)
    assert "MoE model with 8-bit weight-only experts" in refusal(
        CT, w4a16(INT4 | {"num_bits": 8}), moe
    )
    narrow = types.SimpleNamespace(**vars(moe) | {"moe_intermediate_size": 48})
    assert "moe_intermediate_size (48) is not a multiple of it" in refusal(CT, w4a16(), narrow)


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

    assert KunlunPlatformBase.supported_quantization[:3] == [CT, "kunlun_gptq", "kunlun_awq"]
    for method in (CT, "kunlun_gptq", "kunlun_awq"):
        KunlunPlatformBase.verify_quantization(method)
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


# Weight-only 4-bit tensors: packing and group size ------------------------------------------


def write_int4_checkpoint(folder, kind: str, *, depth=64, channels=32, groups=2, replace=None):
    """One layer of a GPTQ / AWQ / compressed-tensors pack-quantized checkpoint (zeros)."""
    from safetensors.torch import save_file

    if kind == "w8a16":
        tensors = {".weight_packed": torch.zeros(channels, depth // 4, dtype=torch.int32),
                   ".weight_scale": torch.ones(channels, groups, dtype=torch.float16),
                   ".weight_shape": torch.tensor([channels, depth])}  # fmt: skip
    elif kind.startswith("gptq"):
        tensors = {".qweight": torch.zeros(depth // 8, channels, dtype=torch.int32),
                   ".qzeros": torch.zeros(groups, channels // 8, dtype=torch.int32),
                   ".scales": torch.ones(groups, channels, dtype=torch.float16),
                   ".g_idx": torch.arange(depth, dtype=torch.int32) % groups}  # fmt: skip
    elif kind == "awq":
        tensors = {".qweight": torch.zeros(depth, channels // 8, dtype=torch.int32),
                   ".qzeros": torch.zeros(groups, channels // 8, dtype=torch.int32),
                   ".scales": torch.ones(groups, channels, dtype=torch.float16)}  # fmt: skip
    else:
        tensors = {".weight_packed": torch.zeros(channels, depth // 8, dtype=torch.int32),
                   ".weight_scale": torch.ones(channels, groups, dtype=torch.float16),
                   ".weight_shape": torch.tensor([channels, depth])}  # fmt: skip
    tensors = {LAYER + suffix: tensor for suffix, tensor in (tensors | (replace or {})).items()}
    tensors = {name: tensor for name, tensor in tensors.items() if tensor is not None}
    save_file(tensors | {"lm_head.weight": torch.zeros(32, 16)}, str(folder / "model.safetensors"))
    return str(folder)


INT4_METHODS = {
    "gptq": ("kunlun_gptq", GPTQ),
    "awq": ("kunlun_awq", AWQ),
    "w4a16": (CT, w4a16()),
    "gptq-act-order": ("kunlun_gptq", GPTQ | {"desc_act": True}),
    "w8a16": (CT, w4a16(INT4 | {"num_bits": 8})),
}


@pytest.mark.parametrize("kind", list(INT4_METHODS))
def test_complete_4bit_checkpoints_pass(tmp_path, kind):
    method, quant_config = INT4_METHODS[kind]
    check_quantization(method, quant_config, SMALL, write_int4_checkpoint(tmp_path, kind))


@pytest.mark.parametrize(
    ("kind", "replace", "says"),
    [
        ("gptq", {".scales": None}, f"{LAYER}.scales (group scales) is missing"),
        ("gptq", {".qweight": torch.zeros(8, 32, dtype=torch.int8)},
         f"{LAYER}.qweight is I8 [8, 32], expected a 2-D I32 packed 4-bit weight"),
        ("gptq", {".scales": torch.ones(4, 32, dtype=torch.float16)},
         f"{LAYER}.scales is [4, 32], expected [2, 32] (K 64, N 32, group size 32)"),
        ("awq", {".qzeros": None}, f"{LAYER}.qzeros (packed zero points) is missing"),
        ("awq", {".qweight": torch.zeros(64, 32, dtype=torch.int32)},
         f"{LAYER}.scales is [2, 32], expected [2, 256]"),
        ("w4a16", {".weight_scale": torch.ones(32, 1, dtype=torch.float16)},
         f"{LAYER}.weight_scale is [32, 1], expected [32, 2] (K 64, N 32, group size 32)"),
        ("w8a16", {".weight_packed": torch.zeros(32, 8, dtype=torch.int32)},
         f"{LAYER}.weight_scale is [32, 2], expected [32, 1] (K 32, N 32, group size 32)"),
        ("gptq-act-order", {".g_idx": None},
         f"{LAYER}.g_idx (act-order's group of each input channel) is missing"),
        ("gptq-act-order", {".g_idx": torch.zeros(32, dtype=torch.int32)},
         f"{LAYER}.g_idx is I32 [32], expected an integer [64] (K)"),
    ],
    ids=["gptq missing scales", "gptq int8 qweight", "gptq group size mismatch",
         "awq missing zeros", "awq unpacked qweight", "w4a16 group size mismatch",
         "w8a16 read as 4-bit", "act-order missing g_idx", "act-order short g_idx"],
)  # fmt: skip
def test_a_4bit_checkpoint_that_does_not_match_its_config_is_refused_naming_the_tensor(
    tmp_path, kind, replace, says
):
    method, quant_config = INT4_METHODS[kind]
    model = write_int4_checkpoint(tmp_path, kind, replace=replace)
    with pytest.raises(UnsupportedQuantization) as error:
        check_quantization(method, quant_config, SMALL, model)
    message = str(error.value)
    assert says in message and "does not match its quantization_config" in message


def test_gptq_act_order_is_refused_with_tensor_parallelism():
    """Act-order runs (the plugin's kernel takes the input order) with one rank; with more, the
    row-parallel layers' input channels would be cut across its groups."""
    act_order = GPTQ | {"desc_act": True}
    check_quantization("kunlun_gptq", act_order, SMALL)
    with pytest.raises(UnsupportedQuantization) as error:
        check_quantization("kunlun_gptq", act_order, SMALL, tensor_parallel_size=2)
    assert "act-order (desc_act true) on --tensor-parallel-size 2" in str(error.value)
    # With one group per output channel act-order changes nothing: no refusal.
    check_quantization("kunlun_gptq", act_order | {"group_size": -1}, SMALL, tensor_parallel_size=2)
