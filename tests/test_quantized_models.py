"""Quantized checkpoints end to end through the plugin (compressed-tensors W8A8 int8; weight-only
4-bit: compressed-tensors W4A16, GPTQ, AWQ).

Checkpoints are made offline from the tiny models (vllm_kunlun.model_zoo.quantized, what
`vllm-kunlun quantize` writes). Each is checked against two independent references:

- transformers running the same checkpoint dequantized to float32, with the scheme's activation
  quantization applied in front of every quantized linear layer (tests/quant_reference.py):
  greedy tokens equal, token for token, with one allowance. Quantization is a step function: the
  two stacks sum in different orders, and an activation within float32 noise of a rounding
  boundary lands one int8 step apart, which moves the logits by up to about 1e-2. So a prompt
  may part from the reference only at a position where the reference's best two logits are
  within TIE_MARGIN (a near tie), and is not compared after it (the contexts differ then);
  and most prompts must match all the way.
- vLLM's in-tree CPU backend (oneDNN int8 GEMMs) on the same checkpoint: top-5 logprobs of the
  first positions agree within QUANT_LOGPROB_TOLERANCE. The two quantize activations with
  different roundings (oneDNN's vs round-half-to-even), so an activation value on a rounding
  boundary may land one int8 step apart; that moves a logprob by about 1e-3 on these models.

Every quantized linear layer must be a plugin op in the route report, and the quant ops must
have run. Checkpoints the plugin cannot run are refused before any worker starts, naming the
option or tensor.
"""

import json
import shutil

import pytest

from tests.engine import IN_TREE_ENV, PROMPTS, emulation_env, read_op_stats, run_generation
from tests.quant_reference import hf_fake_quant_greedy
from tests.route_checks import assert_only_plugin_ops_and_listed_native_layers, route_env
from tests.test_models import LOGPROB_POSITIONS, TOP, assert_logprobs_agree
from vllm_kunlun import routes
from vllm_kunlun.model_zoo.quantized import quantized_checkpoint

pytestmark = pytest.mark.engine

MAX_TOKENS = 32
#: Logit gap under which the reference's greedy choice is a near tie (see the docstring).
TIE_MARGIN = 0.02
QUANT_LOGPROB_TOLERANCE = 1e-2
#: The quant ops each scheme's linear layers run, and the plugin kernel that runs them.
INT8 = ("KunlunInt8ScaledMMLinearKernel", "int8_scaled_mm")
WNA16 = ("KunlunWNA16LinearKernel",)
SCHEME_OPS = {
    "w8a8-dynamic": (*INT8, "int8_quant_per_token"),
    "w8a8-static": (*INT8, "int8_quant_static"),
    "w8a8-static-asym": (*INT8, "int8_quant_static"),
    "w4a16": (*WNA16, "wna16_gemm"),
    "gptq": (*WNA16, "wna16_gemm"),
    "gptq-act-order": (*WNA16, "wna16_gemm"),
    "awq": (*WNA16, "wna16_gemm"),
    "w4a16-asym": (*WNA16, "wna16_gemm"),
    "w8a16": (*WNA16, "w8a16_gemm"),
}


@pytest.fixture(scope="session")
def quantized_model(tmp_path_factory, tiny_model_factory):
    root = tmp_path_factory.mktemp("quantized")

    def make(arch: str, scheme: str):
        return quantized_checkpoint(tiny_model_factory(arch), scheme, root)

    return make


def assert_same_tokens_up_to_near_ties(plugin: list[list[int]], model) -> None:
    reference, margins = hf_fake_quant_greedy(model, PROMPTS, MAX_TOKENS)
    parted = 0
    for i, (got, want) in enumerate(zip(plugin, reference, strict=True)):
        if got == want:
            continue
        first = next(p for p, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
        assert margins[i][first] < TIE_MARGIN, (
            f"prompt {i} ({PROMPTS[i]!r}) parts from the reference at position {first}, where "
            f"the reference's margin is {margins[i][first]:.4f}:\n plugin {got}\n HF     {want}"
        )
        parted += 1
    assert parted <= len(PROMPTS) // 4, f"{parted} of {len(PROMPTS)} prompts parted at near ties"


def check_quantized(model, scheme: str, tmp_path, *, in_tree: bool, enforce_eager: bool) -> dict:
    stats_dir = tmp_path / "ops"
    env = emulation_env(stats_dir, **route_env(tmp_path))
    result = run_generation(model, PROMPTS, MAX_TOKENS, env=env, logprobs=TOP, in_process=True,
                            enforce_eager=enforce_eager)  # fmt: skip
    assert result["platform"] == "EmulatedKunlunPlatform"
    assert_same_tokens_up_to_near_ties(result["token_ids"], model)
    counts = read_op_stats(stats_dir)
    kernel, *ops = SCHEME_OPS[scheme]
    assert all(counts.get(op, 0) > 0 for op in ops), counts
    assert_only_plugin_ops_and_listed_native_layers(tmp_path, result["log"], counts)
    (report,) = routes.read_reports(tmp_path / "routes")
    quantized = [row for row in report.rows if kernel in row.detail]
    assert quantized and all(row.route == routes.PLUGIN_OP for row in quantized)
    # Only the unquantized LM head (and embedding) stay a native GEMM.
    native_linear = [row for row in report.rows if "UnquantizedLinearMethod" in row.detail]
    assert not native_linear, native_linear
    if in_tree:
        reference = run_generation(model, PROMPTS, LOGPROB_POSITIONS, env=IN_TREE_ENV,
                                   logprobs=TOP, gpu_memory_utilization=0.3,
                                   in_process=True)  # fmt: skip
        assert reference["platform"] == "CpuPlatform"
        assert_logprobs_agree(result["logprobs"], reference["logprobs"], QUANT_LOGPROB_TOLERANCE)
    return counts


@pytest.mark.parametrize(
    ("arch", "scheme", "in_tree", "compiled"),
    [
        ("llama", "w8a8-dynamic", True, False),
        ("llama", "w8a8-static", False, False),
        # vLLM's default torch.compile path traces the quant ops through their fake kernels.
        ("qwen2", "w8a8-static-asym", False, True),
        ("phi3", "w8a8-dynamic", False, False),
    ],
)
def test_w8a8_models_match_fake_quantized_transformers(arch, scheme, in_tree, compiled,
                                                       quantized_model, tmp_path):  # fmt: skip
    model = quantized_model(arch, scheme)
    check_quantized(model, scheme, tmp_path, in_tree=in_tree, enforce_eager=not compiled)


@pytest.mark.parametrize(
    ("arch", "scheme", "compiled"),
    [
        # vLLM's default torch.compile path traces wna16_gemm through its fake kernel.
        ("llama", "gptq", True),
        # GPTQ act-order (desc_act): vLLM 0.32 refuses it; the plugin's kernel sorts the
        # weight's rows by g_idx at load and takes the sort as its input order.
        ("llama", "gptq-act-order", False),
        # AWQ through the engine: test_weight_only_4bit_prompt_logprobs_match_in_tree.
        # compressed-tensors W4A16 with zero points (Qwen2: qkv bias); symmetric W4A16 layers
        # are checked in tests/test_wna16_layer.py.
        ("qwen2", "w4a16-asym", False),
        # 8-bit weight-only (compressed-tensors W8A16): w8a16_gemm.
        ("llama", "w8a16", False),
    ],
)
def test_weight_only_models_match_dequantized_transformers(
    arch, scheme, compiled, quantized_model, tmp_path
):
    """Weight-only checkpoints (4-bit, 8-bit) in float32 (GPTQ and AWQ too, though their files
    are fp16): the reference is transformers on the dequantized weights, with no activation
    quantization. The in-tree comparison is below, in bf16 (vLLM's CPU wNa16 GEMM takes no
    float32)."""
    model = quantized_model(arch, scheme)
    check_quantized(model, scheme, tmp_path, in_tree=False, enforce_eager=not compiled)


#: Largest difference allowed between the plugin's and in-tree's bf16 prompt logprobs (4-bit;
#: measured 0.024 on both checkpoints).
WNA16_BF16_LOGPROB_TOLERANCE = 0.05


@pytest.mark.parametrize("scheme", ["awq"])
def test_weight_only_4bit_prompt_logprobs_match_in_tree(scheme, quantized_model, tmp_path):
    """vLLM's in-tree CPU backend (its wNa16 GEMM; bf16 or fp16 only) on the same checkpoint:
    the logprob of every prompt token given its prefix, both in bf16 (same contexts, so a near
    tie cannot make the two part)."""
    model = quantized_model("llama", scheme)
    figures = {}
    for name, env in (("plugin", emulation_env(tmp_path / "ops")), ("in-tree", IN_TREE_ENV)):
        result = run_generation(model, PROMPTS, 1, env=env, dtype="bfloat16", prompt_logprobs=0,
                                gpu_memory_utilization=0.3, in_process=True)  # fmt: skip
        figures[name] = [lp for prompt in result["prompt_logprobs"] for lp in prompt[1:]]
    assert read_op_stats(tmp_path / "ops").get("wna16_gemm", 0) > 0
    gaps = [abs(a - b) for a, b in zip(figures["plugin"], figures["in-tree"], strict=True)]
    print(f"\n{scheme}: {len(gaps)} prompt logprobs, largest gap {max(gaps):.4f}")
    assert max(gaps) <= WNA16_BF16_LOGPROB_TOLERANCE, max(gaps)


@pytest.mark.parametrize(
    ("arch", "scheme", "op", "method"),
    [
        ("qwen3-moe", "w8a8-dynamic", "moe_experts_w8a8", "KunlunW8A8Int8MoEMethod"),
        # Weight-only 4-bit experts: symmetric on Qwen3-MoE, with zero points on Mixtral
        # (w1 / w3 / w2 expert names).
        ("qwen3-moe", "w4a16", "moe_experts_wna16", "KunlunWNA16MoEMethod"),
        ("mixtral", "w4a16-asym", "moe_experts_wna16", "KunlunWNA16MoEMethod"),
        # Grouped sigmoid routing with a correction bias and a shared expert (GLM-4.5), and
        # biased softmax routing (ERNIE-4.5): the routing op is moe_grouped_topk.
        ("glm4-moe", "w8a8-dynamic", "moe_experts_w8a8", "KunlunW8A8Int8MoEMethod"),
        ("ernie-moe", "w4a16", "moe_experts_wna16", "KunlunWNA16MoEMethod"),
    ],
)
def test_quantized_moe_matches_fake_quantized_transformers(
    arch, scheme, op, method, quantized_model, tmp_path
):
    """MoE models with quantized experts (and attention): vLLM's int8 and wNa16 MoE backends need
    AMX (absent here) or CUDA, so only transformers is the reference (fake-quantized activations
    for W8A8, the dequantized weights for W4A16); the experts run the plugin's quantized op."""
    model = quantized_model(arch, scheme)
    stats_dir = tmp_path / "ops"
    env = emulation_env(stats_dir, **route_env(tmp_path))
    result = run_generation(model, PROMPTS, MAX_TOKENS, env=env, in_process=True)
    assert_same_tokens_up_to_near_ties(result["token_ids"], model)
    counts = read_op_stats(stats_dir)
    assert counts.get(op, 0) > 0 and counts.get("moe_experts", 0) == 0, counts
    assert_only_plugin_ops_and_listed_native_layers(tmp_path, result["log"], counts)
    (report,) = routes.read_reports(tmp_path / "routes")
    assert report.route_of("KunlunRoutedExperts") == {routes.PLUGIN_OP}
    (experts,) = [row for row in report.rows if row.layer_type == "KunlunRoutedExperts"]
    routing = "moe_softmax_topk" if arch in ("qwen3-moe", "mixtral") else "moe_grouped_topk"
    assert f"{method} -> kunlun.{routing}, kunlun.{op}" in experts.detail


def copy_with(model, tmp_path, *, config_update=None, drop_tensor=None):
    """A copy of a quantized checkpoint with its quantization_config changed or a tensor gone."""
    target = tmp_path / "edited"
    shutil.copytree(model, target)
    if config_update is not None:
        config_file = target / "config.json"
        config = json.loads(config_file.read_text())
        config_update(config["quantization_config"])
        config_file.write_text(json.dumps(config))
    if drop_tensor is not None:
        from safetensors.torch import load_file, save_file

        (path,) = target.glob("*.safetensors")
        tensors = load_file(str(path))
        del tensors[drop_tensor]
        save_file(tensors, str(path), metadata={"format": "pt"})
    return target


def refused(model, tmp_path) -> str:
    with pytest.raises(AssertionError) as failure:
        run_generation(model, PROMPTS[:1], 2, env=emulation_env(tmp_path / "ops"), timeout=300)
    return str(failure.value)


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (dict(drop_tensor="model.layers.1.mlp.down_proj.weight_scale"),
         "model.layers.1.mlp.down_proj.weight_scale (the weight's scale) is missing"),
    ],
    ids=["missing scale"],
)  # fmt: skip
def test_checkpoints_the_plugin_cannot_run_are_refused_before_loading(
    edit, says, quantized_model, tmp_path
):
    model = copy_with(quantized_model("llama", "w8a8-dynamic"), tmp_path, **edit)
    log = refused(model, tmp_path)
    assert says in log, log[-3000:]
    assert "Starting to load model" not in log  # refused in the engine process, before workers
