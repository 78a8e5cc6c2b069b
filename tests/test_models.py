"""End to end: greedy decoding through the plugin equals Hugging Face transformers, and its
logprobs agree with vLLM's in-tree CPU backend.

Everything runs in float32: in bf16 the two stacks round differently (fused vs unfused ops), so
long continuations may legitimately diverge; float32 makes the comparison exact on token ids.
The plugin and the in-tree backend differ only in kernels (summation order, fp32 everywhere), so
their top-5 logprobs of the first 8 generated positions agree within LOGPROB_TOLERANCE.
"""

import re

import pytest

from tests.engine import (
    IN_TREE_ENV,
    PROMPTS,
    emulation_env,
    hf_greedy,
    read_op_stats,
    run_generation,
)
from tests.route_checks import assert_only_plugin_ops_and_listed_native_layers, route_env

pytestmark = pytest.mark.engine

MAX_TOKENS = 32
PLUGIN_OPS = ("prefill_attention", "decode_attention", "reshape_and_cache", "rms_norm",
              "fused_add_rms_norm", "rotary_embedding", "silu_and_mul")  # fmt: skip


def assert_same_tokens(plugin: list[list[int]], reference: list[list[int]]) -> None:
    for i, (got, want) in enumerate(zip(plugin, reference, strict=True)):
        assert got == want, f"prompt {i} ({PROMPTS[i]!r}) diverges:\n plugin {got}\n HF     {want}"


GEMMA_OPS = ("prefill_attention", "decode_attention", "reshape_and_cache", "gemma_rms_norm",
             "gemma_fused_add_rms_norm", "rotary_embedding", "gelu_and_mul")  # fmt: skip


LOGPROB_TOLERANCE = 1e-3
LOGPROB_POSITIONS, TOP = 8, 5


def assert_logprobs_agree(plugin: list[list[dict]], in_tree: list[list[dict]],
                          tolerance: float = LOGPROB_TOLERANCE) -> None:  # fmt: skip
    """Top-5 tokens and their logprobs at the first 8 positions, prompt by prompt. A token may
    be in one top-5 and not the other only if it ties the 5th place within the tolerance."""
    for i, (ours_positions, theirs_positions) in enumerate(zip(plugin, in_tree, strict=True)):
        for pos in range(LOGPROB_POSITIONS):
            ours, theirs = ours_positions[pos], theirs_positions[pos]
            ours_top = sorted(ours, key=ours.get, reverse=True)[:TOP]
            fifth = sorted(theirs.values(), reverse=True)[TOP - 1]
            for token in ours_top:
                where = f"prompt {i} position {pos} token {token}"
                if token in theirs:
                    assert abs(ours[token] - theirs[token]) <= tolerance, (
                        f"{where}: plugin {ours[token]:.6f} vs in-tree {theirs[token]:.6f}"
                    )
                else:
                    assert ours[token] <= fifth + tolerance, f"{where}: not in-tree top-5"


def check_logprobs_against_in_tree(model, prompts: list[str], plugin: list[list[dict]]) -> None:
    in_tree = run_generation(model, prompts, LOGPROB_POSITIONS, env=IN_TREE_ENV, logprobs=TOP,
                             in_process=True,
                             gpu_memory_utilization=0.3)  # fmt: skip
    assert in_tree["platform"] == "CpuPlatform"
    assert_logprobs_agree(plugin, in_tree["logprobs"])


def check_model(model, tmp_path, plugin_ops: tuple[str, ...] = PLUGIN_OPS,
                rotary_class: str | None = None, engine_process: bool = False) -> dict:  # fmt: skip
    """Greedy tokens equal transformers, logprobs agree with in-tree, the plugin ops ran, and
    the route report has only plugin ops and listed native layers (tests/route_checks.py).
    With engine_process, vLLM's engine core runs in a process of its own, as `vllm serve` runs
    it, and the check includes that process layout; otherwise in the generating process."""
    stats_dir = tmp_path / "ops"
    env = emulation_env(stats_dir, **route_env(tmp_path))
    result = run_generation(
        model, PROMPTS, MAX_TOKENS, env=env, logprobs=TOP, in_process=not engine_process
    )
    assert result["platform"] == "EmulatedKunlunPlatform"
    # One XPU: its worker runs in the engine process (vLLM's "uni" executor), as on a real XPU.
    engine = "EngineCore" if engine_process else "MainProcess"
    assert re.search(rf"\({engine} pid=\d+\).*Worker 0 runs on emulated XPU 0", result["log"])
    assert_same_tokens(result["token_ids"], hf_greedy(model, PROMPTS, MAX_TOKENS))
    check_logprobs_against_in_tree(model, PROMPTS, result["logprobs"])
    counts = read_op_stats(stats_dir)
    missing = [op for op in plugin_ops if counts.get(op, 0) == 0]
    assert not missing, f"plugin ops that never ran: {missing}; counts: {counts}"
    assert_only_plugin_ops_and_listed_native_layers(
        tmp_path, result["log"], counts, moe="moe_experts" in plugin_ops,
        rotary_class=rotary_class,
    )  # fmt: skip
    return counts


def test_default_model_matches_transformers(default_model, tmp_path):
    counts = check_model(default_model, tmp_path, engine_process=True)
    # 30 layers: every step runs attention once per layer.
    assert counts["reshape_and_cache"] % 30 == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3"])
def test_tiny_models_match_transformers(arch, tiny_model_factory, tmp_path):
    check_model(tiny_model_factory(arch), tmp_path)


def test_gemma2_matches_transformers(tiny_model_factory, tmp_path):
    """Soft-capped attention and logits, alternating sliding window, GELU-tanh gating, Gemma's
    (1 + w) RMSNorm and tied embeddings, all through the plugin's ops."""
    counts = check_model(tiny_model_factory("gemma2"), tmp_path, plugin_ops=GEMMA_OPS)
    assert counts.get("silu_and_mul", 0) == 0 and counts.get("rms_norm", 0) == 0


#: The rotary class each rope-scaled tiny model must route to the plugin.
ROTARY_OF = {"llama3": "Llama3RotaryEmbedding", "qwen3-yarn": "YaRNScalingRotaryEmbedding"}


@pytest.mark.parametrize("arch", ["llama3", "qwen3-yarn"])
def test_rope_scaled_models_match_transformers(arch, tiny_model_factory, tmp_path):
    """Llama 3.1 rope scaling and YaRN: vLLM's Llama3RotaryEmbedding and
    YaRNScalingRotaryEmbedding caches, rotated by the plugin's rotary op (the route report
    names the layer type)."""
    check_model(tiny_model_factory(arch), tmp_path, rotary_class=ROTARY_OF[arch])


LONG_PREFIX = (
    "Kunlun is a family of AI accelerators. The third generation, the P800, serves large "
    "language models in data centres, and vLLM schedules their requests in batches. "
) * 3
LONG_PROMPTS = [LONG_PREFIX + tail for tail in ("Question one:", "Another question", "Last")]


def test_chunked_prefill_prefix_hits_and_mixed_batches_match_transformers(
    tiny_model_factory, tmp_path
):
    """A 64-token step budget splits the ~110-token prompts into chunks, mixes prefill chunks
    with decodes in one step, and lets later requests reuse the shared prefix's cached blocks."""
    model = tiny_model_factory("llama")
    prompts = LONG_PROMPTS + PROMPTS[:3]
    result = run_generation(
        model, prompts, 16, env=emulation_env(tmp_path / "ops"),
        max_num_batched_tokens=64, max_num_seqs=4, enable_prefix_caching=True, block_size=16,
        in_process=True,
    )  # fmt: skip
    reference = hf_greedy(model, prompts, 16)
    for got, want, prompt in zip(result["token_ids"], reference, prompts, strict=True):
        assert got == want, f"{prompt[-20:]!r}: plugin {got} vs HF {want}"


def test_sliding_window_matches_transformers(tiny_model_factory, tmp_path):
    model = tiny_model_factory("mistral")
    env = emulation_env(tmp_path / "ops", **route_env(tmp_path))
    result = run_generation(model, LONG_PROMPTS, 16, env=env, logprobs=TOP, in_process=True)
    assert result["token_ids"] == hf_greedy(model, LONG_PROMPTS, 16)
    check_logprobs_against_in_tree(model, LONG_PROMPTS, result["logprobs"])
    assert_only_plugin_ops_and_listed_native_layers(
        tmp_path, result["log"], read_op_stats(tmp_path / "ops")
    )


def test_compile_mode_matches_transformers(tiny_model_factory, tmp_path):
    """vLLM's default torch.compile path traces the plugin ops through their fake kernels."""
    model = tiny_model_factory("qwen3")
    stats_dir = tmp_path / "ops"
    result = run_generation(model, PROMPTS[:4], 16, env=emulation_env(stats_dir),
                            enforce_eager=False)  # fmt: skip
    assert result["token_ids"] == hf_greedy(model, PROMPTS[:4], 16)
    counts = read_op_stats(stats_dir)
    assert all(counts.get(op, 0) > 0 for op in PLUGIN_OPS), counts
