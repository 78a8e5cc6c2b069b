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
CASES = [("llama", scheme) for scheme in SCHEMES if scheme != "w8a8-smooth"] + [
    ("phi3", "w8a8-static-asym")
]
CASE_IDS = [f"{arch}-{scheme}" for arch, scheme in CASES]


@pytest.fixture(scope="session")
def quantized(tmp_path_factory, tiny_model_factory):
    cache_root = tmp_path_factory.mktemp("quantized")

    def make(arch: str, scheme: str) -> Path:
        return quantized_checkpoint(tiny_model_factory(arch), scheme, cache_root)

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
    supported = "w8a8-dynamic, w8a8-smooth, w8a8-static, w8a8-static-asym"
    with pytest.raises(ValueError, match=f"'w4a4'; supported: {supported}"):
        make_quantized_checkpoint(source, tmp_path / "out", "w4a4")
    with pytest.raises(ValueError, match="'gptq'"):
        quantized_checkpoint(source, "gptq", tmp_path / "cache")
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
