"""Offline quantized checkpoints (vllm_kunlun.model_zoo.quantized): the folders are what
compressed-tensors writes, and the reference in tests/quant_reference.py reads them.

No engine starts here: that vLLM's in-tree CPU backend loads the folders and matches the
reference token for token is checked by hand, with tests/engine.py's run_generation.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.quant_reference import (
    ExpertLoop,
    fake_quant_dynamic_per_token,
    fake_quant_static,
    load_fake_quant_model,
)
from vllm_kunlun.model_zoo.quantized import (
    CALIBRATION_PROMPTS,
    MARKER,
    SCHEMES,
    make_quantized_checkpoint,
    quantized_checkpoint,
    smooth_mlps,
)

CLI = str(Path(sys.executable).with_name("vllm-kunlun"))

#: The input-activation args each scheme writes.
INPUTS = {
    "w8a8-dynamic": dict(strategy="token", dynamic=True, symmetric=True),
    "w8a8-smooth": dict(strategy="token", dynamic=True, symmetric=True),
    "w8a8-static": dict(strategy="tensor", dynamic=False, symmetric=True),
    "w8a8-static-asym": dict(strategy="tensor", dynamic=False, symmetric=False),
}
WEIGHTS = dict(num_bits=8, type="int", strategy="channel", symmetric=True, dynamic=False,
               group_size=None)  # fmt: skip

#: The Linear layers of one decoder layer (phi3's are fused).
LINEARS = {
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "phi3": ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"],
}  # fmt: skip
NUM_LAYERS = 2

#: Round-to-nearest of the source weights (w8a8-smooth's are smoothed first: tested below).
CASES = [("llama", scheme) for scheme in INPUTS if scheme != "w8a8-smooth"] + [
    ("phi3", "w8a8-static-asym")
]
CASE_IDS = [f"{arch}-{scheme}" for arch, scheme in CASES]


@pytest.fixture(scope="session")
def quantized(tmp_path_factory, tiny_model_factory):
    cache_root = tmp_path_factory.mktemp("quantized")

    def make(arch: str, scheme: str, gptq: bool = False) -> Path:
        return quantized_checkpoint(tiny_model_factory(arch), scheme, cache_root, gptq=gptq)

    return make


def quantized_linears(arch: str) -> list[str]:
    return [f"model.layers.{i}.{name}" for i in range(NUM_LAYERS) for name in LINEARS[arch]]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for path in folder.glob("*.safetensors"):
        found.update(load_file(path))
    return found


def quantization_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("arch,scheme", CASES, ids=CASE_IDS)
def test_config_is_what_compressed_tensors_writes(quantized, arch, scheme):
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig

    folder = quantized(arch, scheme)
    written = quantization_config(folder)
    assert written["quant_method"] == "compressed-tensors"
    assert written["format"] == "int-quantized"
    assert written["quantization_status"] == "compressed"
    assert written["ignore"] == ["lm_head"]
    assert written["kv_cache_scheme"] is None
    assert written["version"] == compressed_tensors.__version__
    assert list(written["config_groups"]) == ["group_0"]
    group = written["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    assert group["format"] == "int-quantized"
    assert group["output_activations"] is None
    assert WEIGHTS.items() <= group["weights"].items()
    assert (dict(num_bits=8, type="int") | INPUTS[scheme]).items() <= group[
        "input_activations"
    ].items()
    assert group["input_activations"]["zp_dtype"] == (
        None if INPUTS[scheme]["symmetric"] else "torch.int8"
    )

    # compressed-tensors parses it, and writes back exactly the same (ModelCompressor's
    # update_config adds version, quant_method and empty sparsity/transform configs).
    parsed = QuantizationConfig.model_validate(written)
    assert written == {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **json.loads(json.dumps(parsed.model_dump(exclude={"quant_method"}))),
    }
    marker = json.loads((folder / MARKER).read_text())
    assert marker["scheme"] == scheme and marker["format"] == "int-quantized"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file()


def test_vllm_reads_the_scheme_each_config_asks_for(quantized):
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    for scheme, inputs in INPUTS.items():
        config = CompressedTensorsConfig.from_config(
            quantization_config(quantized("llama", scheme))
        )
        assert config.ignore == ["lm_head"]
        args = config.target_scheme_map["Linear"]
        weights, input_args = args["weights"], args["input_activations"]
        static = CompressedTensorsConfig._is_static_tensor_w8a8(weights, input_args)
        dynamic = CompressedTensorsConfig._is_dynamic_token_w8a8(weights, input_args)
        assert (static, dynamic) == (not inputs["dynamic"], inputs["dynamic"]), scheme
        assert input_args.symmetric == inputs["symmetric"]


@pytest.mark.parametrize("arch,scheme", CASES, ids=CASE_IDS)
def test_tensors_have_the_names_dtypes_and_shapes_of_the_format(
    quantized, tiny_model_factory, arch, scheme
):
    source = tensors(tiny_model_factory(arch))
    written = tensors(quantized(arch, scheme))
    static, symmetric = not INPUTS[scheme]["dynamic"], INPUTS[scheme]["symmetric"]
    linears = quantized_linears(arch)
    expected = set(source)
    for linear in linears:
        expected.add(f"{linear}.weight_scale")
        if static:
            expected.add(f"{linear}.input_scale")
        if static and not symmetric:
            expected.add(f"{linear}.input_zero_point")
    assert set(written) == expected

    for linear in linears:
        weight, original = written[f"{linear}.weight"], source[f"{linear}.weight"]
        assert weight.dtype == torch.int8 and weight.shape == original.shape, linear
        scale = written[f"{linear}.weight_scale"]
        assert scale.dtype == original.dtype and scale.shape == (original.shape[0], 1)
        assert bool((scale > 0).all())
        if static:
            input_scale = written[f"{linear}.input_scale"]
            assert input_scale.dtype == original.dtype and input_scale.shape == (1,)
            assert float(input_scale) > 0
        if static and not symmetric:
            zero_point = written[f"{linear}.input_zero_point"]
            assert zero_point.dtype == torch.int8 and zero_point.shape == (1,)
    for name, tensor in source.items():  # embeddings, norms, lm_head: untouched
        if name.rpartition(".")[0] not in linears:
            assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor)


@pytest.mark.parametrize("arch,scheme", CASES, ids=CASE_IDS)
def test_weights_round_trip_within_half_a_step(quantized, tiny_model_factory, arch, scheme):
    from compressed_tensors.compressors import IntQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    source = tensors(tiny_model_factory(arch))
    written = tensors(quantized(arch, scheme))
    group = quantization_config(quantized(arch, scheme))["config_groups"]["group_0"]
    ct_scheme = QuantizationScheme.model_validate(group)
    for linear in quantized_linears(arch):
        q, scale = written[f"{linear}.weight"], written[f"{linear}.weight_scale"]
        original = source[f"{linear}.weight"]
        dequantized = q.float() * scale.float()
        error = (dequantized - original.float()).abs()
        # Half a step, up to float32 rounding of the error itself (|w| is up to 127.5 steps).
        assert bool((error <= scale.float() * (0.5 + 1e-4)).all()), linear
        # compressed-tensors' min-max scale: absmax / 127.5 (its int8 range is [-128, 127]).
        absmax = original.float().abs().amax(dim=1, keepdim=True)
        torch.testing.assert_close(scale.float(), absmax / 127.5)
        # compressed-tensors' own decompression agrees with the plain arithmetic.
        state = {"weight": q, "weight_scale": scale}
        ct_weight = IntQuantizationCompressor.decompress(state, ct_scheme)["weight"]
        torch.testing.assert_close(ct_weight.float(), dequantized)


@pytest.mark.parametrize("scheme", ["w8a8-static", "w8a8-static-asym"])
def test_static_input_scales_cover_the_calibration_inputs(quantized, tiny_model_factory, scheme):
    """The observed input range of every Linear over CALIBRATION_PROMPTS, observed again
    here, gives the written scale (and zero point) by compressed-tensors' min-max rule."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source_dir = tiny_model_factory("llama")
    written = tensors(quantized("llama", scheme))
    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    ranges: dict[str, list[float]] = {}

    def observe(name):
        def hook(_module, args):
            low, high = ranges.get(name, [0.0, 0.0])
            ranges[name] = [min(low, args[0].min().item()), max(high, args[0].max().item())]

        return hook

    for name, module in model.named_modules():
        if name in quantized_linears("llama"):
            module.register_forward_pre_hook(observe(name))
    with torch.no_grad():
        for prompt in CALIBRATION_PROMPTS:
            model(tokenizer(prompt, return_tensors="pt").input_ids, use_cache=False)

    for name, (low, high) in ranges.items():
        scale = written[f"{name}.input_scale"].item()
        if scheme == "w8a8-static":
            assert scale == pytest.approx(max(-low, high) / 127.5, rel=1e-5), name
        else:
            assert scale == pytest.approx((high - low) / 255, rel=1e-5), name
            zero_point = written[f"{name}.input_zero_point"].item()
            assert zero_point == round(-128 - low / scale), name
            # The observed range is representable: [low, high] maps into [-128, 127].
            assert low / scale + zero_point >= -128.5
            assert high / scale + zero_point <= 127.5
    # q, k and v see the same input, so one scale serves the fused projection.
    for i in range(NUM_LAYERS):
        qkv = {written[f"model.layers.{i}.self_attn.{p}_proj.input_scale"].item() for p in "qkv"}
        assert len(qkv) == 1


def test_reference_dequantizes_and_fake_quantizes(quantized):
    folder = quantized("llama", "w8a8-static-asym")
    written = tensors(folder)
    model = load_fake_quant_model(folder)
    modules = dict(model.named_modules())
    for linear in quantized_linears("llama"):
        expected = written[f"{linear}.weight"].float() * written[f"{linear}.weight_scale"]
        assert torch.equal(modules[linear].weight.data, expected)
        assert len(modules[linear]._forward_pre_hooks) == 1
    assert torch.equal(modules["lm_head"].weight.data, written["lm_head.weight"])
    assert not modules["lm_head"]._forward_pre_hooks

    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.54, 0.3]])
    dynamic = fake_quant_dynamic_per_token(x)
    step = 2.54 / 127
    assert torch.equal(dynamic[0], torch.zeros(3))
    torch.testing.assert_close(dynamic[1], torch.round(x[1] / step) * step)
    # static asymmetric: round, shift by the zero point, clamp to int8, shift back.
    scale, zero_point = torch.tensor([0.1]), torch.tensor([-100], dtype=torch.int8)
    y = fake_quant_static(torch.tensor([-3.0, 0.04, 30.0]), scale, zero_point)
    torch.testing.assert_close(y, torch.tensor([-2.8, 0.0, 22.7]))  # -128 and 127 clamp
    torch.testing.assert_close(fake_quant_static(torch.tensor([20.0]), scale), torch.tensor([12.7]))


def test_an_unknown_scheme_is_refused(tmp_path, tiny_model_factory):
    source = tiny_model_factory("llama")
    supported = ("w8a8-dynamic, w8a8-smooth, w8a8-static, w8a8-static-asym, w4a16, "
                 "w4a16-asym, w8a16, gptq, gptq-act-order, awq")  # fmt: skip
    with pytest.raises(ValueError, match=f"'w4a4'; supported: {supported}"):
        make_quantized_checkpoint(source, tmp_path / "out", "w4a4")
    with pytest.raises(ValueError, match="'gptq-v2'"):
        quantized_checkpoint(source, "gptq-v2", tmp_path / "cache")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_a_non_empty_target_is_refused(tmp_path, tiny_model_factory):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        make_quantized_checkpoint(tiny_model_factory("llama"), tmp_path / "out", "w8a8-static")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_quantized_checkpoint_is_made_once(tmp_path, tiny_model_factory):
    source = tiny_model_factory("llama")

    def stamps(folder: Path) -> dict[str, int]:
        return {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}

    first = quantized_checkpoint(source, "w8a8-dynamic", tmp_path)
    before = stamps(first)
    assert quantized_checkpoint(source, "w8a8-dynamic", tmp_path) == first
    assert stamps(first) == before
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no staging left behind
    # A folder without its marker (an interrupted copy) is made again.
    (first / MARKER).unlink()
    assert quantized_checkpoint(source, "w8a8-dynamic", tmp_path) == first
    assert (first / MARKER).is_file() and stamps(first).keys() == before.keys()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_KUNLUN_EMULATE")}
    return subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=300)


def test_cli_quantizes_a_checkpoint(tmp_path, tiny_model_factory):
    target = tmp_path / "w8a8"
    proc = run_cli("quantize", str(tiny_model_factory("llama")), str(target),
                   "--scheme", "w8a8-static")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(target)
    assert "calibrating" in proc.stderr
    inputs = quantization_config(target)["config_groups"]["group_0"]["input_activations"]
    assert inputs["strategy"] == "tensor"


def test_cli_refuses_a_missing_folder_and_an_unknown_scheme(tmp_path, tiny_model_factory):
    proc = run_cli("quantize", str(tmp_path / "nowhere"), str(tmp_path / "out"),
                   "--scheme", "w8a8-dynamic")  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"vllm-kunlun quantize: source checkpoint folder {tmp_path / 'nowhere'} does not exist"
    ]
    proc = run_cli("quantize", str(tiny_model_factory("llama")), str(tmp_path / "out"),
                   "--scheme", "int3")  # fmt: skip
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert "unknown quantization scheme 'int3'" in line and "w8a8-static-asym" in line
    assert not (tmp_path / "out").exists()


def test_cli_help_lists_the_schemes():
    proc = run_cli("quantize", "--help")
    assert proc.returncode == 0
    for scheme, description in SCHEMES.items():
        assert scheme in proc.stdout
        assert description.split(",")[0] in proc.stdout
    # GPTQ is opt-in and says why.
    assert "--gptq" in proc.stdout and "experimental" in proc.stdout


# MoE checkpoints (w8a8-dynamic only): routed experts quantized per expert, routers kept.

#: Per MoE model: the MoE block's saved name, the expert projections as saved (gate, up,
#: down), and the ignore list written.
MOE = {
    "qwen3-moe": ("mlp", ("gate_proj", "up_proj", "down_proj"), ["lm_head", "re:.*mlp.gate$"]),
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2"),
                ["lm_head", "re:.*block_sparse_moe.gate$"]),
    "qwen2-moe": ("mlp", ("gate_proj", "up_proj", "down_proj"),
                  ["lm_head", "re:.*mlp.gate$", "re:.*mlp.shared_expert_gate$"]),
}  # fmt: skip
MOE_ARCHS = list(MOE)


def expert_weights(arch: str, names) -> list[str]:
    """The saved names of the routed experts' weights (without `.weight`)."""
    block, projections, _ = MOE[arch]
    found = []
    for name in names:
        head, _, leaf = name.rpartition(".")
        parts = head.split(".")
        if leaf == "weight" and len(parts) > 3 and parts[-3] == "experts":
            assert parts[-4] == block and parts[-1] in projections, name
            found.append(head)
    return found


def test_w8a16_is_refused_for_moe_and_for_4bit_only_options(tmp_path, tiny_model_factory):
    """8-bit weight-only MoE experts have no plugin kernel; GPTQ and the activation-aware search
    are written for 4-bit grids."""
    with pytest.raises(ValueError, match="MoE model.*dense models only.*w4a16 or w8a8-dynamic"):
        make_quantized_checkpoint(tiny_model_factory("qwen3-moe"), tmp_path / "out", "w8a16")
    source = tiny_model_factory("llama")
    with pytest.raises(ValueError, match="GPTQ is written for the 4-bit schemes only"):
        make_quantized_checkpoint(source, tmp_path / "out", "w8a16", gptq=True)
    with pytest.raises(ValueError, match="activation-aware scaling is written for the 4-bit"):
        make_quantized_checkpoint(source, tmp_path / "out", "w8a16", activation_aware=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_config_is_what_compressed_tensors_writes(quantized, arch):
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig

    written = quantization_config(quantized(arch, "w8a8-dynamic"))
    assert written["format"] == "int-quantized"
    assert written["quantization_status"] == "compressed"
    assert written["ignore"] == MOE[arch][2]
    assert list(written["config_groups"]) == ["group_0"]
    group = written["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["format"] == "int-quantized"
    assert WEIGHTS.items() <= group["weights"].items()
    assert (dict(num_bits=8, type="int") | INPUTS["w8a8-dynamic"]).items() <= group[
        "input_activations"
    ].items()
    parsed = QuantizationConfig.model_validate(written)
    assert written == {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **json.loads(json.dumps(parsed.model_dump(exclude={"quant_method"}))),
    }


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_tensors_names_dtypes_shapes_and_round_trip(quantized, tiny_model_factory, arch):
    source = tensors(tiny_model_factory(arch))
    written = tensors(quantized(arch, "w8a8-dynamic"))
    experts = expert_weights(arch, source)
    config = json.loads((tiny_model_factory(arch) / "config.json").read_text())
    num_experts = config.get("num_experts") or config["num_local_experts"]
    assert len(experts) == NUM_LAYERS * num_experts * 3
    # Every other 2-D weight of the decoder layers is a Linear that compressed-tensors
    # quantized, but for the routers and shared-expert gates.
    kept = [n for n in source if n.endswith((".gate.weight", ".shared_expert_gate.weight"))]
    assert len(kept) == NUM_LAYERS * (2 if arch == "qwen2-moe" else 1)
    linears = [
        name.removesuffix(".weight")
        for name, tensor in source.items()
        if ".layers." in name and tensor.dim() == 2 and name not in kept
    ]
    assert set(experts) <= set(linears)
    assert set(written) == set(source) | {f"{linear}.weight_scale" for linear in linears}
    for linear in linears:
        q, scale = written[f"{linear}.weight"], written[f"{linear}.weight_scale"]
        original = source[f"{linear}.weight"]
        assert q.dtype == torch.int8 and q.shape == original.shape, linear
        assert scale.dtype == original.dtype and scale.shape == (original.shape[0], 1)
        error = (q.float() * scale.float() - original.float()).abs()
        assert bool((error <= scale.float() * (0.5 + 1e-4)).all()), linear
        absmax = original.float().abs().amax(dim=1, keepdim=True)
        torch.testing.assert_close(scale.float(), absmax / 127.5)
    for name, tensor in source.items():  # routers, norms, embeddings: untouched
        if name.removesuffix(".weight") not in linears:
            assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_vllm_maps_every_expert_tensor_and_picks_w8a8_int8_moe(quantized, arch):
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    folder = quantized(arch, "w8a8-dynamic")
    block, (gate, up, down), ignore = MOE[arch]
    names = list(tensors(folder))
    experts = expert_weights(arch, names)
    num_experts = 1 + max(int(name.split(".")[-2]) for name in experts)
    # RoutedExperts.load_weights: each checkpoint name holding a mapping's weight_name is
    # renamed to the layer's parameter (w13_ for gate and up, w2_ for down).
    mapping = RoutedExperts.build_expert_params_mapping(
        gate, down, up, num_experts=num_experts, routed_experts_prefix="", include_fused=True
    )
    for name in [n for n in names if ".experts." in n]:
        layer_name = name[: name.index(".experts.")] + ".experts"
        [(param, weight_name, expert_id, shard)] = [m for m in mapping if m[1] in name]
        assert expert_id == int(weight_name.split(".")[1]) == int(name.split(".")[-3])
        param_name = name.replace(weight_name, param).removeprefix(f"{layer_name}.")
        projection = name.split(".")[-2]
        assert shard == {gate: "w1", up: "w3", down: "w2"}[projection]
        leaf = name.rpartition(".")[2]
        assert param_name == f"{'w2' if projection == down else 'w13'}_{leaf}", name

    config = CompressedTensorsConfig.from_config(quantization_config(folder))
    assert config.ignore == ignore
    # get_moe_method: the experts layer (class RoutedExperts) takes the scheme of its
    # unfused names `<layer>.0.<gate|up|down>` once "Linear" also targets RoutedExperts.
    config._add_fused_moe_to_target_scheme_map()
    layer = RoutedExperts.__new__(RoutedExperts)
    prefix = f"model.layers.0.{block}.experts"
    schemes = [config.get_scheme_dict(layer, f"{prefix}.0.{p}") for p in (gate, up, down)]
    assert schemes[0] is not None and schemes[0] == schemes[1] == schemes[2]
    weights, inputs = schemes[0]["weights"], schemes[0]["input_activations"]
    assert config._is_dynamic_token_w8a8(weights, inputs)
    assert not config._is_fp8_w8a8(weights, inputs)
    assert weights.strategy == "channel" and inputs.strategy == "token" and inputs.dynamic
    # The router (vLLM's GateLinear, which the "Linear" target would match by class name)
    # and the shared-expert gate are ignored: unquantized.
    gate_linear = type("GateLinear", (torch.nn.Module,), {})()
    assert config.get_scheme_dict(gate_linear, "model.layers.1.xyz.gate") is not None
    assert config.get_scheme_dict(gate_linear, f"model.layers.1.{block}.gate") is None
    if arch == "qwen2-moe":
        assert (
            config.get_scheme_dict(torch.nn.Linear(1, 1), "model.layers.1.mlp.shared_expert_gate")
            is None
        )
        assert (
            config.get_scheme_dict(
                torch.nn.Linear(1, 1), "model.layers.1.mlp.shared_expert.down_proj"
            )
            is not None
        )


@pytest.mark.parametrize("scheme", ["w8a8-static", "w8a8-static-asym"])
def test_static_schemes_are_refused_for_moe(tmp_path, tiny_model_factory, scheme):
    with pytest.raises(ValueError, match="MoE model.*dynamic per-token.*w8a8-dynamic"):
        make_quantized_checkpoint(tiny_model_factory("qwen3-moe"), tmp_path / "out", scheme)
    with pytest.raises(ValueError, match="MoE model"):
        quantized_checkpoint(tiny_model_factory("mixtral"), scheme, tmp_path / "cache")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the cache folder


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_loop_equals_transformers_experts(tiny_model_factory, arch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory(arch), dtype=torch.float32)
    experts = model.model.layers[1].mlp.experts
    generator = torch.Generator().manual_seed(0)
    tokens, top_k = 9, 2
    hidden = torch.randn(tokens, experts.hidden_dim, generator=generator)
    index = torch.stack([torch.randperm(experts.num_experts, generator=generator)[:top_k]
                         for _ in range(tokens)])  # fmt: skip
    weights = torch.rand(tokens, top_k, generator=generator)
    with torch.no_grad():
        expected = experts(hidden, index, weights)
        got = ExpertLoop(experts)(hidden, index, weights)
    assert float(expected.abs().max()) > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_reference_fuses_dequantized_experts_and_loops_them(quantized, tiny_model_factory, arch):
    from transformers import AutoModelForCausalLM

    folder = quantized(arch, "w8a8-dynamic")
    written = tensors(folder)
    block, (gate, up, down), _ = MOE[arch]
    model = load_fake_quant_model(folder)
    source = AutoModelForCausalLM.from_pretrained(tiny_model_factory(arch), dtype=torch.float32)
    for i in range(NUM_LAYERS):
        experts = model.model.layers[i].mlp.experts
        assert isinstance(experts.forward, ExpertLoop)
        assert experts.forward.fake_quant is fake_quant_dynamic_per_token

        def deq(e, p, i=i):
            prefix = f"model.layers.{i}.{block}.experts.{e}.{p}"
            return written[f"{prefix}.weight"].float() * written[f"{prefix}.weight_scale"]

        for e in range(experts.num_experts):
            assert torch.equal(experts.gate_up_proj[e], torch.cat([deq(e, gate), deq(e, up)]))
            assert torch.equal(experts.down_proj[e], deq(e, down))
        router = model.model.layers[i].mlp.gate
        assert torch.equal(router.weight, source.model.layers[i].mlp.gate.weight)
        attention = model.model.layers[i].self_attn.q_proj
        assert len(attention._forward_pre_hooks) == 1
    ids = torch.tensor([[1, 500, 900, 33, 7, 4000]])
    with torch.no_grad():
        got, expected = model(ids).logits, source(ids).logits
    # Close to the float model (the fake quantization is small), not equal to it.
    assert 0 < float((got - expected).abs().max()) < 0.1 * float(expected.abs().max())


# w8a8-smooth: SmoothQuant smoothing of the MLPs' down_proj inputs, folded into the float
# weights, then w8a8-dynamic.

SMOOTH_PROMPTS = ("The quick brown fox jumps over the lazy dog.", "def f(x):\n    return 2 * x")


def float_model(folder: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_smoothing_is_exact_in_float(tiny_model_factory, arch):
    model, tokenizer = float_model(tiny_model_factory(arch))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    prompts = [tokenizer(p, return_tensors="pt").input_ids for p in SMOOTH_PROMPTS]
    with torch.no_grad():
        expected = [model(ids).logits for ids in prompts]
        factors = smooth_mlps(model, tokenizer)
        got = [model(ids).logits for ids in prompts]
    assert sorted(factors) == [f"model.layers.{i}.mlp" for i in range(NUM_LAYERS)]
    for scale in factors.values():  # real per-channel factors, not all one
        assert bool((scale > 0).all()) and float(scale.max() / scale.min()) > 1.5
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    up = "gate_up_proj" if arch == "phi3" else "up_proj"
    assert changed == {f"model.layers.{i}.mlp.{p}.weight" for i in range(NUM_LAYERS)
                       for p in (up, "down_proj")}  # fmt: skip
    if arch == "phi3":  # only the up half of the fused rows
        half = model.config.intermediate_size
        for i in range(NUM_LAYERS):
            name = f"model.layers.{i}.mlp.gate_up_proj.weight"
            assert torch.equal(dict(model.named_parameters())[name][:half], before[name][:half])
    for e, g in zip(expected, got, strict=True):
        assert float(e.abs().max()) > 0.1
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_smoothing_factors_are_smoothquants(tiny_model_factory):
    from vllm_kunlun.model_zoo.quantized import _calibrate

    model, tokenizer = float_model(tiny_model_factory("llama"))
    name = "model.layers.0.mlp.down_proj"
    low, high = _calibrate(model, tokenizer, {name}, per_channel=True)[name]
    w = model.model.layers[0].mlp.down_proj.weight.detach().abs().amax(dim=0)
    # A dead channel (zero weight column) keeps factor 1.
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, 3] = 0
    factors = smooth_mlps(model, tokenizer, alpha=0.5)
    expected = (torch.maximum(-low, high).sqrt() / w.sqrt()).clone()
    expected[3] = 1
    torch.testing.assert_close(factors["model.layers.0.mlp"], expected)


def test_smooth_checkpoint_has_the_config_and_layout_of_dynamic(quantized, tiny_model_factory):
    for arch in ("llama", "phi3"):
        smooth, dynamic = quantized(arch, "w8a8-smooth"), quantized(arch, "w8a8-dynamic")
        config = json.loads((smooth / "config.json").read_text())
        assert config == json.loads((dynamic / "config.json").read_text())
        written, plain = tensors(smooth), tensors(dynamic)
        assert {n: (t.dtype, t.shape) for n, t in written.items()} == {
            n: (t.dtype, t.shape) for n, t in plain.items()
        }
        assert json.loads((smooth / MARKER).read_text())["scheme"] == "w8a8-smooth"
        # The int8 weights are round-to-nearest of the smoothed float model's.
        model, tokenizer = float_model(tiny_model_factory(arch), dtype="auto")
        smooth_mlps(model, tokenizer)
        smoothed = model.state_dict()
        for linear in quantized_linears(arch):
            q, scale = written[f"{linear}.weight"], written[f"{linear}.weight_scale"]
            error = (q.float() * scale.float() - smoothed[f"{linear}.weight"].float()).abs()
            assert bool((error <= scale.float() * (0.5 + 1e-4)).all()), linear
            same = torch.equal(q, plain[f"{linear}.weight"])
            assert same == (".mlp." not in linear or linear.endswith("gate_proj")), linear


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_smooth_is_refused_for_moe(tmp_path, tiny_model_factory, arch):
    with pytest.raises(ValueError, match="MoE model.*smooths dense MLPs only.*w8a8-dynamic"):
        make_quantized_checkpoint(tiny_model_factory(arch), tmp_path / "out", "w8a8-smooth")
    assert list(tmp_path.iterdir()) == []


def test_smooth_is_refused_without_an_up_down_pair():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="w8a8-smooth: found no MLP with up_proj"):
        smooth_mlps(model, tokenizer=None)


# Weight-only 4-bit: compressed-tensors W4A16 (pack-quantized), GPTQ and AWQ. Rounded to
# nearest by default; GPTQ (gptq=True) is built for the tiny llama and GPTQ_SCHEMES only.

INT4 = ["w4a16", "w4a16-asym", "gptq", "gptq-act-order", "awq"]
#: The schemes also built with GPTQ: compressed-tensors' path, the GPTQ format with
#: act-order, the AWQ format.
GPTQ_SCHEMES = ["w4a16-asym", "gptq-act-order", "awq"]
#: The tiny llama's input sizes (hidden 128, intermediate 256) all divide by 128.
TINY_GROUP = 128
#: Half a step, plus the float16 rounding of GPTQ's and AWQ's scales: a value at the edge of
#: the range sits up to 7.5 (GPTQ) or 15 (AWQ) steps from zero, 2^-11 of a step off each.
HALF_STEP = {"w4a16": 0.5 + 1e-4, "w4a16-asym": 0.5 + 1e-4, "gptq": 0.5 + 0.01,
             "gptq-act-order": 0.5 + 0.01, "awq": 0.5 + 0.01}  # fmt: skip


def int4_weights(folder: Path, scheme: str) -> dict[str, torch.Tensor]:
    """The reference's dequantized float weights of the checkpoint, by tensor name."""
    from tests.quant_reference import dequantize_int4

    fmt = {"gptq": "gptq", "gptq-act-order": "gptq", "awq": "awq"}.get(scheme, "pack-quantized")
    return dequantize_int4(tensors(folder), fmt)


def per_weight_step(written: dict, linear: str, scheme: str, shape) -> torch.Tensor:
    """The scale each weight element [N, K] was quantized with."""
    n, k = shape
    if scheme.startswith("w4a16"):
        scale = written[f"{linear}.weight_scale"].float()  # [N, G']
        return scale.repeat_interleave(k // scale.shape[1], dim=1)
    scale = written[f"{linear}.scales"].float()  # [G', N]
    if "g_idx" in [name.rpartition(".")[2] for name in written if name.startswith(linear)]:
        return scale[written[f"{linear}.g_idx"].long()].t()
    return scale.repeat_interleave(k // scale.shape[0], dim=0).t()


@pytest.mark.parametrize("scheme", ["w4a16", "w4a16-asym", "w8a16"])
def test_w4a16_config_is_what_compressed_tensors_writes(quantized, scheme):
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig

    folder = quantized("llama", scheme)
    written = quantization_config(folder)
    symmetric = scheme != "w4a16-asym"
    assert written["format"] == "pack-quantized"
    assert written["quantization_status"] == "compressed"
    assert written["ignore"] == ["lm_head"]
    group = written["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["format"] == "pack-quantized"
    assert group["input_activations"] is None and group["output_activations"] is None
    expected = dict(num_bits=8 if scheme == "w8a16" else 4, type="int", strategy="group",
                    group_size=TINY_GROUP,
                    symmetric=symmetric, dynamic=False, actorder=None,
                    zp_dtype=None if symmetric else "torch.int8")  # fmt: skip
    assert expected.items() <= group["weights"].items()
    parsed = QuantizationConfig.model_validate(written)
    assert written == {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **json.loads(json.dumps(parsed.model_dump(exclude={"quant_method"}))),
    }
    marker = json.loads((folder / MARKER).read_text())
    assert marker["scheme"] == scheme and marker["format"] == "pack-quantized"
    assert marker["group_size"] == TINY_GROUP


@pytest.mark.parametrize("scheme", ["gptq", "gptq-act-order", "awq"])
def test_gptq_and_awq_configs_are_what_the_tools_write(quantized, tiny_model_factory, scheme):
    folder = quantized("llama", scheme)
    config = json.loads((folder / "config.json").read_text())
    source = json.loads((tiny_model_factory("llama") / "config.json").read_text())
    written = config.pop("quantization_config")
    # The tools save float16 models.
    assert config == source | {"dtype": "float16"}
    if scheme == "awq":
        assert written == {"quant_method": "awq", "zero_point": True,
                           "group_size": TINY_GROUP, "bits": 4, "version": "gemm",
                           "modules_to_not_convert": None}  # fmt: skip
        assert not (folder / "quantize_config.json").exists()
    else:
        meta = written.pop("meta")
        assert meta["quantizer"][0].startswith("vllm-kunlun:")
        assert written == {"bits": 4, "group_size": TINY_GROUP,
                           "desc_act": scheme == "gptq-act-order", "sym": True, "lm_head": False,
                           "quant_method": "gptq", "checkpoint_format": "gptq",
                           "pack_dtype": "int32", "damp_percent": 0.01, "static_groups": False,
                           "true_sequential": True}  # fmt: skip
        assert json.loads((folder / "quantize_config.json").read_text()) == written | {"meta": meta}
    marker = json.loads((folder / MARKER).read_text())
    assert marker["scheme"] == scheme and marker["group_size"] == TINY_GROUP
    assert marker["format"] == ("awq" if scheme == "awq" else "gptq")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file()


@pytest.mark.parametrize("scheme", INT4)
def test_int4_tensors_have_the_names_dtypes_and_shapes_of_the_format(
    quantized, tiny_model_factory, scheme
):
    source = tensors(tiny_model_factory("llama"))
    written = tensors(quantized("llama", scheme))
    linears = quantized_linears("llama")
    leaves = {"w4a16": ["weight_packed", "weight_scale", "weight_shape"],
              "gptq": ["qweight", "qzeros", "scales", "g_idx"],
              "awq": ["qweight", "qzeros", "scales"]}  # fmt: skip
    leaves["w4a16-asym"] = [*leaves["w4a16"], "weight_zero_point"]
    leaves["gptq-act-order"] = leaves["gptq"]
    others = [name for name in source if name.rpartition(".")[0] not in linears]
    assert set(written) == set(others) | {f"{m}.{leaf}" for m in linears for leaf in leaves[scheme]}
    for linear in linears:
        n, k = source[f"{linear}.weight"].shape
        groups = k // TINY_GROUP

        def check(leaf, dtype, shape, linear=linear):
            tensor = written[f"{linear}.{leaf}"]
            assert (tensor.dtype, tuple(tensor.shape)) == (dtype, shape), (linear, leaf)

        if scheme.startswith("w4a16"):
            check("weight_packed", torch.int32, (n, k // 8))
            check("weight_scale", torch.float32, (n, groups))  # the model's dtype
            check("weight_shape", torch.int64, (2,))
            assert written[f"{linear}.weight_shape"].tolist() == [n, k]
            if scheme == "w4a16-asym":
                check("weight_zero_point", torch.int32, (n // 8, groups))
        elif scheme == "awq":
            check("qweight", torch.int32, (k, n // 8))
            check("qzeros", torch.int32, (groups, n // 8))
            check("scales", torch.float16, (groups, n))
        else:
            check("qweight", torch.int32, (k // 8, n))
            check("qzeros", torch.int32, (groups, n // 8))
            check("scales", torch.float16, (groups, n))
            check("g_idx", torch.int32, (k,))
            # GPTQ v1 stores the symmetric zero point 8 as 7 in every nibble.
            assert bool((written[f"{linear}.qzeros"] == 0x77777777).all())
    tool_dtype = None if scheme.startswith("w4a16") else torch.float16
    for name in others:  # embeddings, norms, lm_head: float16 for the tools, else untouched
        expected = source[name] if tool_dtype is None else source[name].to(tool_dtype)
        assert written[name].dtype == expected.dtype and torch.equal(written[name], expected)


@pytest.mark.parametrize("scheme", INT4)
def test_int4_weights_round_trip_within_half_a_step(quantized, tiny_model_factory, scheme):
    """Round to nearest (the default): each weight is a whole number of steps within the
    format's range, within half a step (the stored scale) of the float weight, the scales
    are the format's min-max formula over the float weights, and the file dequantizes
    exactly to round_to_nearest with the format's grid and groups."""
    from vllm_kunlun.model_zoo.gptq import round_to_nearest

    source = tensors(tiny_model_factory("llama"))
    folder = quantized("llama", scheme)
    assert "weights" not in json.loads((folder / MARKER).read_text())
    written = tensors(folder)
    dequantized = int4_weights(folder, scheme)
    for linear in quantized_linears("llama"):
        original = source[f"{linear}.weight"].float()
        step = per_weight_step(written, linear, scheme, original.shape)
        got = dequantized[f"{linear}.weight"]
        steps = got / step  # q - zero
        assert bool((steps - steps.round()).abs().max() < 1e-3), linear
        low, high = (-8, 7) if scheme in ("w4a16", "gptq", "gptq-act-order") else (-15, 15)
        assert int(steps.round().min()) >= low and int(steps.round().max()) <= high, linear
        error = (got - original).abs()
        assert bool((error <= step * HALF_STEP[scheme]).all()), linear
        assert 0.2 < float((error / step).mean()) < 0.3, linear  # really 4 bits
        # The same groups (act-order's from g_idx), rounded to nearest with the grid.
        g_idx = written.get(f"{linear}.g_idx")
        order = None if g_idx is None else torch.argsort(g_idx.long(), stable=True)
        grid = int4_grid(scheme, folder, source[f"{linear}.weight"])
        expected = round_to_nearest(source[f"{linear}.weight"], TINY_GROUP, grid, order)
        # compressed-tensors rounds w / s + z, here round(w / s) + z: a float tie (w / s
        # half-way between two integers) may go either way, one step apart.
        apart = (got - expected.dequantize()).abs() / step
        ratio = original / step
        tie = (ratio - ratio.floor() - 0.5).abs() < 1e-4
        assert bool(((apart < 1e-6) | (tie & ((apart - 1).abs() < 1e-4))).all()), linear
        if scheme.startswith("gptq"):
            continue  # act-order groups are not contiguous: checked with g_idx below
        grouped = original.reshape(original.shape[0], -1, TINY_GROUP)
        absmax, low_, high_ = grouped.abs().amax(-1), grouped.amin(-1), grouped.amax(-1)
        if scheme == "w4a16":
            expected_scale = absmax / 7.5  # compressed-tensors' int4 range [-8, 7]
            scale = written[f"{linear}.weight_scale"]
        elif scheme == "w4a16-asym":
            expected_scale = (high_.clamp(min=0) - low_.clamp(max=0)) / 15
            scale = written[f"{linear}.weight_scale"]
        else:
            expected_scale = ((high_ - low_) / 15).half().float()
            scale = written[f"{linear}.scales"].float().t()
        torch.testing.assert_close(scale.float(), expected_scale)


def calibration_inputs(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The float model's inputs [tokens, K] of the named Linears on the calibration text,
    gathered here with hooks of the test's own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_kunlun.model_zoo.calibration import calibration_chunks

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_pre_hook(
            lambda _m, args, name=name: seen[name].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for name in names
    ]
    with torch.no_grad():
        for chunk in calibration_chunks(AutoTokenizer.from_pretrained(folder)):
            model(torch.tensor([chunk]), use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(xs).double() for name, xs in seen.items()}


def gptq_reference(scheme: str, weight: torch.Tensor, hessian: torch.Tensor, folder: Path):
    """GPTQ of one weight with the grid and group order the scheme writes."""
    from vllm_kunlun.model_zoo import quantized_int4 as int4
    from vllm_kunlun.model_zoo.gptq import gptq_quantize

    order = int4.act_order(torch.diagonal(hessian)) if scheme == "gptq-act-order" else None
    grid = int4_grid(scheme, folder, weight)
    return gptq_quantize(weight, hessian, TINY_GROUP, grid, order)


@pytest.mark.parametrize("scheme", GPTQ_SCHEMES)
def test_int4_checkpoints_dequantize_to_gptqs_weights(quantized, tiny_model_factory, scheme):
    """With gptq=True the written tensors dequantize exactly to GPTQ's result with the float
    model's Hessians on the calibration text (for w4a16-asym the compressed-tensors
    compressor re-rounds GPTQ's weights to the same integers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_kunlun.model_zoo.calibration import calibration_chunks
    from vllm_kunlun.model_zoo.gptq import collect_hessians

    source_dir = tiny_model_factory("llama")
    source = tensors(source_dir)
    folder = quantized("llama", scheme, gptq=True)
    assert json.loads((folder / MARKER).read_text())["weights"] == "gptq"
    dequantized = int4_weights(folder, scheme)
    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype="auto").eval()
    chunks = calibration_chunks(AutoTokenizer.from_pretrained(source_dir))
    hessians = collect_hessians(model, chunks, quantized_linears("llama"))
    for linear in quantized_linears("llama"):
        weight = source[f"{linear}.weight"]
        expected = gptq_reference(scheme, weight, hessians[linear], folder).dequantize()
        assert torch.equal(dequantized[f"{linear}.weight"], expected), linear


def int4_grid(scheme: str, folder: Path, weight: torch.Tensor):
    """The group quantizer (scale and zero formulas, integer range) of the scheme."""
    from compressed_tensors.quantization import QuantizationArgs

    from vllm_kunlun.model_zoo import quantized_int4 as int4
    from vllm_kunlun.model_zoo.quantized import _compressed_tensors_grid

    if scheme.startswith("w4a16"):
        args = quantization_config(folder)["config_groups"]["group_0"]["weights"]
        return _compressed_tensors_grid(QuantizationArgs(**args), weight.dtype)
    return int4.AWQ_GRID if scheme == "awq" else int4.GPTQ_GRID


@pytest.mark.parametrize("scheme", ["awq", "w4a16-asym"])
def test_gptq_lowers_the_layer_output_error_of_round_to_nearest(
    quantized, tiny_model_factory, scheme
):
    """sum over the calibration inputs of ||X W^T - X Q^T||^2, X gathered by the test's own
    hooks: GPTQ's Q (as written with gptq=True) against round to nearest with the format's
    scales (the default checkpoint's weights: test_int4_weights_round_trip_within_...)."""
    from vllm_kunlun.model_zoo.gptq import round_to_nearest

    source_dir = tiny_model_factory("llama")
    source = tensors(source_dir)
    folder = quantized("llama", scheme, gptq=True)
    dequantized = int4_weights(folder, scheme)
    inputs = calibration_inputs(source_dir, quantized_linears("llama"))
    total_gptq = total_rtn = 0.0
    for linear in quantized_linears("llama"):
        weight, x = source[f"{linear}.weight"], inputs[linear]
        rtn = round_to_nearest(weight, TINY_GROUP, int4_grid(scheme, folder, weight))

        def output_error(q, weight=weight, x=x):
            return float(((x @ weight.double().t() - x @ q.double().t()) ** 2).sum())

        gptq_error = output_error(dequantized[f"{linear}.weight"])
        rtn_error = output_error(rtn.dequantize())
        assert gptq_error < rtn_error, linear
        total_gptq, total_rtn = total_gptq + gptq_error, total_rtn + rtn_error
    assert total_gptq < 0.8 * total_rtn


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_an_identity_hessian_is_round_to_nearest(act_order):
    """With H = I the error updates vanish: GPTQ's integers and scales are the plain
    formulas, q = clamp(round(w / s) + 8, 0, 15), s = fp16(2 * absmax / 15) per group."""
    from vllm_kunlun.model_zoo import quantized_int4 as int4
    from vllm_kunlun.model_zoo.gptq import gptq_quantize

    torch.manual_seed(0)
    n, k, group = 16, 256, 64
    weight = torch.randn(n, k)
    order = torch.randperm(k) if act_order else torch.arange(k)
    result = gptq_quantize(weight, torch.eye(k), group, int4.GPTQ_GRID, order)
    g_idx = torch.empty(k, dtype=torch.long)
    g_idx[order] = torch.arange(k) // group
    assert torch.equal(result.g_idx.long(), g_idx)
    absmax = torch.stack([weight[:, g_idx == g].abs().amax(dim=1) for g in range(k // group)], 1)
    scales = (2 * absmax / 15).half().float()
    assert torch.equal(result.scales, scales)
    expected = torch.clamp(torch.round(weight / scales[:, g_idx]) + 8, 0, 15)
    assert torch.equal(result.q, expected)
    # A dead input (never active) is zeroed and the others still quantized.
    hessian = torch.eye(k)
    hessian[3, 3] = 0
    dead = gptq_quantize(weight, hessian, group, int4.GPTQ_GRID, order)
    assert bool((dead.dequantize()[:, 3] == 0).all())


@pytest.mark.parametrize("scheme", ["w4a16", "w4a16-asym"])
def test_w4a16_reference_unpacking_agrees_with_compressed_tensors(quantized, scheme):
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    folder = quantized("llama", scheme)
    written = tensors(folder)
    group = quantization_config(folder)["config_groups"]["group_0"]
    ct_scheme = QuantizationScheme.model_validate(group)
    dequantized = int4_weights(folder, scheme)
    for linear in quantized_linears("llama"):
        state = {leaf: written[name] for name in written
                 for module, _, leaf in [name.rpartition(".")] if module == linear}  # fmt: skip
        ct_weight = PackedQuantizationCompressor.decompress(state, ct_scheme)["weight"]
        torch.testing.assert_close(ct_weight.float(), dequantized[f"{linear}.weight"])


def test_awq_packing_agrees_with_vllms_conversion(quantized, monkeypatch):
    """vLLM repacks AWQ's qweight and qzeros into the standard order (qweight along K,
    zeros [N/8, G'] along N) before its kernels see them; unpacked, they are the values the
    reference reads."""
    from vllm.model_executor import parameter
    from vllm.model_executor.layers.quantization.auto_awq import _convert_awq_to_standard_format

    from tests.quant_reference import AWQ_ORDER, unpack_int4

    # Its parameters ask for the tensor-parallel rank: one rank, no process group here.
    monkeypatch.setattr(parameter, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(parameter, "get_tensor_model_parallel_world_size", lambda: 1)
    written = tensors(quantized("llama", "awq"))
    for linear in quantized_linears("llama"):
        layer = torch.nn.Module()
        for leaf in ("qweight", "qzeros"):
            layer.register_parameter(leaf, torch.nn.Parameter(written[f"{linear}.{leaf}"].clone(),
                                                              requires_grad=False))  # fmt: skip
        _convert_awq_to_standard_format(layer, "qweight", "qzeros", 4)
        q = unpack_int4(written[f"{linear}.qweight"], dim=1, order=AWQ_ORDER)  # [K, N]
        zeros = unpack_int4(written[f"{linear}.qzeros"], dim=1, order=AWQ_ORDER)  # [G', N]
        assert torch.equal(unpack_int4(layer.qweight.data, dim=0), q)
        assert torch.equal(unpack_int4(layer.qzeros.data, dim=0), zeros.t())
        assert int(zeros.min()) > 0 and int(zeros.max()) < 15  # real zero points


def test_gptq_groups_without_and_with_act_order(quantized, tiny_model_factory):
    """g_idx: contiguous groups without act-order; with it (rounded to nearest, no GPTQ), a
    proper group assignment of exactly G channels per group, the channels of higher input
    energy on the calibration text (GPTQ's Hessian diagonal) in earlier groups; scales the
    symmetric min-max of each group."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_kunlun.model_zoo.calibration import calibration_chunks

    source_dir = tiny_model_factory("llama")
    source = tensors(source_dir)
    plain = tensors(quantized("llama", "gptq"))
    ordered = tensors(quantized("llama", "gptq-act-order"))
    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    energy: dict[str, torch.Tensor] = {}

    def observe(name):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            energy[name] = energy.get(name, 0) + (x * x).sum(dim=0)

        return hook

    for name, module in model.named_modules():
        if name in quantized_linears("llama"):
            module.register_forward_pre_hook(observe(name))
    with torch.no_grad():
        for chunk in calibration_chunks(tokenizer):
            model(torch.tensor([chunk]), use_cache=False)

    permuted = 0
    for linear in quantized_linears("llama"):
        k = source[f"{linear}.weight"].shape[1]
        assert torch.equal(plain[f"{linear}.g_idx"].long(), torch.arange(k) // TINY_GROUP)
        g_idx = ordered[f"{linear}.g_idx"].long()
        counts = torch.bincount(g_idx)
        assert counts.tolist() == [TINY_GROUP] * (k // TINY_GROUP), linear
        groups = [energy[linear][g_idx == g] for g in range(len(counts))]
        for earlier, later in zip(groups, groups[1:], strict=False):
            assert float(earlier.min()) >= float(later.max()), linear
        permuted += not bool((g_idx[1:] >= g_idx[:-1]).all())
        # Rounded to nearest: each group's scale is 2 * absmax / 15 over its own channels,
        # in float16.
        weight = source[f"{linear}.weight"].float()
        for g in range(len(counts)):
            absmax = weight[:, g_idx == g].abs().amax(dim=1)
            expected = (2 * absmax / 15).half().float()
            torch.testing.assert_close(ordered[f"{linear}.scales"][g].float(), expected)
    assert permuted == NUM_LAYERS  # the down projections (two groups) really are reordered


def test_vllm_parses_the_int4_configs_and_picks_the_wna16_scheme(quantized):
    from vllm.model_executor.layers.quantization.auto_awq import AutoAWQConfig
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import (
        CompressedTensorsWNA16,
    )
    from vllm.scalar_type import scalar_types

    gptq = quantization_config(quantized("llama", "gptq"))
    assert AutoGPTQConfig.override_quantization_method(gptq, None) == "auto_gptq"
    config = AutoGPTQConfig.from_config(gptq)
    assert (config.weight_bits, config.group_size, config.desc_act) == (4, TINY_GROUP, False)
    assert config.is_sym and not config.lm_head_quantized
    assert config.quant_type == scalar_types.uint4b8  # zero point 8: qzeros are not read
    # vLLM 0.32 no longer loads GPTQ group act-order; the plugin's GPTQ config keeps it.
    act_order = quantization_config(quantized("llama", "gptq-act-order"))
    with pytest.raises(ValueError, match="desc_act=True"):
        AutoGPTQConfig.from_config(act_order)
    from vllm_kunlun.quantization.gptq_awq import KunlunGPTQConfig

    assert KunlunGPTQConfig.from_config(act_order).desc_act is True
    assert KunlunGPTQConfig.from_config(gptq).desc_act is False

    config = AutoAWQConfig.from_config(quantization_config(quantized("llama", "awq")))
    assert (config.weight_bits, config.group_size, config.zero_point) == (4, TINY_GROUP, True)
    assert config.quant_type == scalar_types.uint4 and not config.lm_head_quantized

    for scheme, symmetric in (("w4a16", True), ("w4a16-asym", False)):
        config = CompressedTensorsConfig.from_config(
            quantization_config(quantized("llama", scheme))
        )
        assert config.ignore == ["lm_head"]
        args = config.target_scheme_map["Linear"]
        weights, inputs = args["weights"], args["input_activations"]
        assert inputs is None and config._is_wNa16_group_channel(weights, inputs)
        picked = config._get_scheme_from_parts(weights, inputs, format=args["format"])
        assert isinstance(picked, CompressedTensorsWNA16)
        assert (picked.num_bits, picked.group_size, picked.symmetric) == (4, TINY_GROUP, symmetric)
        assert picked.quant_type == (scalar_types.uint4b8 if symmetric else scalar_types.uint4)


@pytest.mark.parametrize("scheme", INT4)
def test_reference_loads_the_dequantized_int4_weights(quantized, tiny_model_factory, scheme):
    from transformers import AutoModelForCausalLM

    from tests.quant_reference import hf_fake_quant_greedy

    folder = quantized("llama", scheme)
    dequantized = int4_weights(folder, scheme)
    model = load_fake_quant_model(folder)
    modules = dict(model.named_modules())
    for linear in quantized_linears("llama"):
        assert torch.equal(modules[linear].weight.data, dequantized[f"{linear}.weight"])
        assert not modules[linear]._forward_pre_hooks  # weight-only: activations untouched
    source = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"), dtype=torch.float32)
    ids = torch.tensor([[1, 500, 900, 33, 7, 4000]])
    with torch.no_grad():
        got, expected = model(ids).logits, source(ids).logits
    # Near the float model (4-bit groups of 128 are coarse on a tiny random model).
    assert 0 < float((got - expected).abs().max()) < 0.5 * float(expected.abs().max())
    if scheme == "gptq":
        [tokens], [margins] = hf_fake_quant_greedy(folder, ["The capital of France is"], 3)
        assert len(tokens) == len(margins) == 3


def test_group_size_is_the_largest_that_divides_every_input(tmp_path, tiny_model_factory,
                                                           default_model):  # fmt: skip
    from vllm_kunlun.model_zoo.quantized_int4 import choose_group_size

    config = json.loads((default_model / "config.json").read_text())
    attention = config["num_attention_heads"] * config.get(
        "head_dim", config["hidden_size"] // config["num_attention_heads"]
    )
    sizes = {"hidden": config["hidden_size"], "o_proj": attention,
             "down_proj": config["intermediate_size"]}  # fmt: skip
    assert choose_group_size(sizes) == (64 if config["hidden_size"] == 576 else 128)
    assert choose_group_size({"a": 128, "b": 256}) == 128
    assert choose_group_size({"a": 96 * 4, "b": 96}) == 32
    with pytest.raises(ValueError, match="no group size of 128, 64, 32 divides.*: 48, 80"):
        choose_group_size({"a": 128, "b": 48, "c": 80})


def test_a_group_size_that_fits_is_chosen_and_recorded(quantized, capfd):
    # Mixtral's experts are 96 wide: their down projections take groups of 32.
    folder = quantized("mixtral", "w4a16")
    group = quantization_config(folder)["config_groups"]["group_0"]["weights"]
    assert group["group_size"] == 32
    assert json.loads((folder / MARKER).read_text())["group_size"] == 32
    written = tensors(folder)
    down = written["model.layers.0.block_sparse_moe.experts.0.w2.weight_scale"]
    assert tuple(down.shape) == (128, 96 // 32)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_w4a16_moe_packs_the_experts_and_keeps_the_routers(quantized, tiny_model_factory, arch):
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    folder = quantized(arch, "w4a16")
    source = tensors(tiny_model_factory(arch))
    written = tensors(folder)
    block, (gate, up, down), ignore = MOE[arch]
    experts = expert_weights(arch, source)
    kept = [n for n in source if n.endswith((".gate.weight", ".shared_expert_gate.weight"))]
    linears = [name.removesuffix(".weight") for name, tensor in source.items()
               if ".layers." in name and tensor.dim() == 2 and name not in kept]  # fmt: skip
    assert set(experts) <= set(linears)
    packed = {f"{m}.{leaf}" for m in linears for leaf in ("weight_packed", "weight_scale",
                                                          "weight_shape")}  # fmt: skip
    assert set(written) == (set(source) - {f"{m}.weight" for m in linears}) | packed
    dequantized = int4_weights(folder, "w4a16")
    group_size = quantization_config(folder)["config_groups"]["group_0"]["weights"]["group_size"]
    for expert in experts:
        original = source[f"{expert}.weight"].float()
        scale = written[f"{expert}.weight_scale"].float()
        assert scale.shape == (original.shape[0], original.shape[1] // group_size)
        step = scale.repeat_interleave(group_size, dim=1)
        error = (dequantized[f"{expert}.weight"] - original).abs()
        assert bool((error <= step * (0.5 + 1e-4)).all()), expert
    for name in kept:
        assert torch.equal(written[name], source[name])

    config = CompressedTensorsConfig.from_config(quantization_config(folder))
    assert config.ignore == ignore
    mapping = RoutedExperts.build_expert_params_mapping(
        gate, down, up, num_experts=1 + max(int(e.split(".")[-2]) for e in experts),
        routed_experts_prefix="", include_fused=True,
    )  # fmt: skip
    for name in [n for n in written if ".experts." in n]:
        [(param, weight_name, _, _)] = [m for m in mapping if m[1] in name]
        leaf = name.rpartition(".")[2]
        param_name = name.replace(weight_name, param).rpartition(".experts.")[2]
        assert param_name == f"{'w2' if name.split('.')[-2] == down else 'w13'}_{leaf}", name
    config._add_fused_moe_to_target_scheme_map()
    layer = RoutedExperts.__new__(RoutedExperts)
    prefix = f"model.layers.0.{block}.experts"
    [scheme] = {json.dumps(config.get_scheme_dict(layer, f"{prefix}.0.{p}"), default=str)
                for p in (gate, up, down)}  # fmt: skip
    found = config.get_scheme_dict(layer, f"{prefix}.0.{gate}")
    assert config._is_wNa16_group_channel(found["weights"], found["input_activations"])
    gate_linear = type("GateLinear", (torch.nn.Module,), {})()
    assert config.get_scheme_dict(gate_linear, f"model.layers.1.{block}.gate") is None


def test_w4a16_moe_reference_fuses_the_dequantized_experts(quantized):
    folder = quantized("qwen3-moe", "w4a16")
    dequantized = int4_weights(folder, "w4a16")
    model = load_fake_quant_model(folder)
    experts = model.model.layers[0].mlp.experts
    assert not isinstance(experts.forward, ExpertLoop)  # weight-only: transformers' own
    for e in range(experts.num_experts):
        prefix = f"model.layers.0.mlp.experts.{e}"
        gate_up = torch.cat([dequantized[f"{prefix}.gate_proj.weight"],
                             dequantized[f"{prefix}.up_proj.weight"]])  # fmt: skip
        assert torch.equal(experts.gate_up_proj[e], gate_up)
        assert torch.equal(experts.down_proj[e], dequantized[f"{prefix}.down_proj.weight"])


@pytest.mark.parametrize("scheme", ["gptq", "gptq-act-order", "awq"])
def test_gptq_and_awq_are_refused_for_moe(tmp_path, tiny_model_factory, scheme):
    with pytest.raises(ValueError, match=f"MoE model: scheme '{scheme}' is written for dense"):
        make_quantized_checkpoint(tiny_model_factory("qwen3-moe"), tmp_path / "out", scheme)
    assert list(tmp_path.iterdir()) == []


def test_int4_cache_keeps_the_group_size_in_the_marker(tmp_path, tiny_model_factory):
    source = tiny_model_factory("llama")
    first = quantized_checkpoint(source, "awq", tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert quantized_checkpoint(source, "awq", tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    # A marker without the group size (written before groups existed) is made again.
    marker = json.loads((first / MARKER).read_text())
    del marker["group_size"]
    (first / MARKER).write_text(json.dumps(marker))
    assert quantized_checkpoint(source, "awq", tmp_path) == first
    assert json.loads((first / MARKER).read_text())["group_size"] == TINY_GROUP


def test_gptq_is_opt_in_and_cached_apart_from_round_to_nearest(quantized, tiny_model_factory):
    """A GPTQ copy and a round-to-nearest copy of one scheme are different cache entries
    (folder name and marker), neither taken for the other; GPTQ is for 4-bit schemes."""
    from vllm_kunlun.model_zoo.quantized import is_complete

    source = tiny_model_factory("llama")
    rtn, gptq = quantized("llama", "awq"), quantized("llama", "awq", gptq=True)
    assert (
        rtn.parent == gptq.parent
        and rtn != gptq
        and gptq.name.startswith(f"{source.name}-awq-gptq-")
    )
    rtn_marker = json.loads((rtn / MARKER).read_text())
    gptq_marker = json.loads((gptq / MARKER).read_text())
    assert gptq_marker == rtn_marker | {"weights": "gptq"}
    assert is_complete(rtn, source, "awq") and is_complete(gptq, source, "awq", gptq=True)
    assert not is_complete(rtn, source, "awq", gptq=True)
    assert not is_complete(gptq, source, "awq")
    assert not torch.equal(tensors(rtn)["model.layers.0.mlp.down_proj.qweight"],
                           tensors(gptq)["model.layers.0.mlp.down_proj.qweight"])  # fmt: skip
    with pytest.raises(ValueError, match="4-bit schemes only, not 'w8a8-dynamic'"):
        quantized("llama", "w8a8-dynamic", gptq=True)
