"""MLA (Multi-head Latent Attention) models end to end through the plugin's MLA backend
(vllm_kunlun.attention.mla) and `mla` ops, on tiny random DeepSeek checkpoints
(vllm_kunlun.model_zoo.tiny):

- DeepSeek-V2: no query compression, a small latent (64 + rope 16), softmax routing, a shared
  expert; DeepSeek-V3: compressed queries, the real latent sizes (512 + 64), grouped sigmoid
  routing with a correction bias.
- Greedy float32 output equals transformers token for token (8 prompts, 32 tokens); DeepSeek-V3's
  top-5 logprobs equal transformers' (IN_TREE says why not vLLM's in-tree CPU MLA backend's).
- Op accounting: the latent-cache write runs once per layer per step, decode and prefill
  attention per layer, and the ordinary attention ops never.
- Prefix caching, chunked prefill, mixed batches and compile mode give transformers' tokens
  too; tensor parallel 2 gives TP 1's; the Kunlun binding (on the stand-in library) too.
- The KV cache holds one [512 latent | 64 rope] row per token and layer: the engine's block
  count for a fixed memory budget is that arithmetic.
"""

import re

import pytest

from tests.engine import PROMPTS, emulation_env, hf_greedy, read_op_stats, run_generation
from tests.route_checks import assert_only_plugin_ops_and_listed_native_layers, route_env
from tests.test_feature_matrix import run_probes
from tests.test_models import LOGPROB_POSITIONS, MAX_TOKENS, TOP, assert_same_tokens

pytestmark = pytest.mark.engine

LAYERS = 2
MLA_OPS = ("concat_and_cache_mla", "mla_decode", "mla_prefill", "rms_norm", "fused_add_rms_norm",
           "rotary_embedding", "moe_grouped_topk", "moe_experts", "silu_and_mul")  # fmt: skip
#: The ordinary attention ops: an MLA model must never run them.
DENSE_ATTENTION_OPS = ("reshape_and_cache", "decode_attention", "prefill_attention")


def assert_mla_ops_ran_per_layer(counts: dict[str, int]) -> None:
    missing = [op for op in MLA_OPS if not counts.get(op)]
    assert not missing, f"plugin ops that never ran: {missing}; counts: {counts}"
    for op in ("concat_and_cache_mla", "mla_decode", "mla_prefill"):
        assert counts[op] % LAYERS == 0, (op, counts)
    # One cache write per layer per step; a step decodes, prefills, or both.
    steps = counts["concat_and_cache_mla"] // LAYERS
    assert max(counts["mla_decode"], counts["mla_prefill"]) // LAYERS <= steps, counts
    assert (counts["mla_decode"] + counts["mla_prefill"]) // LAYERS >= steps, counts
    assert not any(counts.get(op) for op in DENSE_ATTENTION_OPS), counts


def run_mla_model(model, tmp_path, **engine_kwargs) -> tuple[dict, dict[str, int]]:
    """Greedy tokens equal transformers, the MLA ops ran per layer, and the route report has only
    plugin ops and listed native layers (the MLA attention layer a plugin op)."""
    stats_dir = tmp_path / "ops"
    env = emulation_env(stats_dir, **route_env(tmp_path))
    result = run_generation(
        model, PROMPTS, MAX_TOKENS, env=env, logprobs=TOP, in_process=True, **engine_kwargs
    )
    assert result["platform"] == "EmulatedKunlunPlatform"
    assert_same_tokens(result["token_ids"], hf_greedy(model, PROMPTS, MAX_TOKENS))
    counts = read_op_stats(stats_dir)
    assert_mla_ops_ran_per_layer(counts)
    assert_only_plugin_ops_and_listed_native_layers(
        tmp_path, result["log"], counts, moe=True, attention="MLAAttention"
    )
    return result, counts


@pytest.fixture(scope="module")
def deepseek_v2(tiny_model_factory):
    return tiny_model_factory("deepseek-v2")


@pytest.fixture(scope="module")
def deepseek_v2_tp1(deepseek_v2, tmp_path_factory) -> dict:
    result, _ = run_mla_model(deepseek_v2, tmp_path_factory.mktemp("deepseek-v2"))
    return result


def test_deepseek_v2_matches_transformers(deepseek_v2_tp1):
    """Checked in the fixture (one engine, shared with the TP test): tokens, ops, routes."""
    assert len(deepseek_v2_tp1["token_ids"]) == len(PROMPTS)


#: Why DeepSeek-V3's logprobs are compared with transformers and not with vLLM's in-tree backend.
IN_TREE = (
    "vLLM 0.32's in-tree CPU MLA path (CPU_MLA backend, block size 16) gives first-token "
    "logprobs up to 0.3 away from transformers' on these tiny DeepSeek checkpoints, with softmax "
    "or grouped sigmoid routing alike, while the plugin's equal transformers' to 1e-6"
)


def assert_logprobs_equal_transformers(model, logprobs: list[list[dict]],
                                       token_ids: list[list[int]]) -> None:  # fmt: skip
    """The plugin's top-5 logprobs at the first generated positions equal transformers' on the
    same sequences (prompt and generated tokens fed in one forward)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    for prompt, positions, generated in zip(PROMPTS, logprobs, token_ids, strict=True):
        prompt_ids = tokenizer(prompt).input_ids
        ids = torch.tensor([prompt_ids + generated[:LOGPROB_POSITIONS]])
        with torch.no_grad():
            expected = hf(ids).logits[0].log_softmax(-1)
        for pos in range(LOGPROB_POSITIONS):
            row = expected[len(prompt_ids) - 1 + pos]
            for token, logprob in positions[pos].items():
                assert abs(logprob - row[int(token)].item()) < 1e-4, (prompt, pos, token)


#: KV-cache budget of the DeepSeek-V3 run, and what it must hold: one row of 512 + 64 float32
#: values per token and layer, in whole blocks of the plugin's default block size (64).
KV_CACHE_BYTES = 64 * 2**20
LATENT_ROW = 512 + 64


def test_deepseek_v3_matches_transformers_with_a_latent_kv_cache(tiny_model_factory, tmp_path):
    """Grouped sigmoid routing with a correction bias, q_lora_rank set, real latent sizes; the
    engine's KV capacity for a fixed budget is the latent arithmetic, not a per-head K/V's.
    Logprobs are compared with transformers: IN_TREE says why not with vLLM's in-tree backend."""
    model = tiny_model_factory("deepseek-v3")
    result, _ = run_mla_model(model, tmp_path, kv_cache_memory_bytes=KV_CACHE_BYTES)
    assert_logprobs_equal_transformers(model, result["logprobs"], result["token_ids"])

    block_size, float32 = 64, 4
    bytes_per_block = block_size * LATENT_ROW * float32 * LAYERS
    expected_tokens = KV_CACHE_BYTES // bytes_per_block * block_size
    match = re.search(r"KV cache size: ([\d,]+) tokens", result["log"])
    assert match, "the engine did not log its KV cache size"
    assert int(match.group(1).replace(",", "")) == expected_tokens


def test_prefix_caching_chunked_prefill_and_mixed_batches_match_transformers(deepseek_v2, tmp_path):
    """A 64-token step budget splits the long prompts into chunks whose context comes from the
    latent cache; later requests reuse a 200-token shared prefix; 8 requests over 4 sequence
    slots mix prefill chunks with decodes. Every answer equals transformers'."""
    from tests.features_probe import batch_prompts, long_prompt, shared_prefix_prompts

    stats_dir = tmp_path / "ops"
    probes = run_probes(
        deepseek_v2, ["prefix_cache", "long_prompt", "batch"], emulation_env(stats_dir),
        enable_prefix_caching=True, max_num_batched_tokens=64, block_size=16, max_num_seqs=4,
    )  # fmt: skip
    prefix, long, batch = probes["prefix_cache"], probes["long_prompt"], probes["batch"]
    assert prefix["hits"] > 0, f"no prefix-cache hits: {prefix}"
    assert long["prompt_tokens"] > 64, "the prompt must exceed the 64-token step budget"
    assert prefix["token_ids"] == hf_greedy(deepseek_v2, shared_prefix_prompts(), 12)
    assert [long["token_ids"]] == hf_greedy(deepseek_v2, [long_prompt()], 12)
    assert_same_tokens(batch["token_ids"], hf_greedy(deepseek_v2, batch_prompts(), 48))
    counts = read_op_stats(stats_dir)
    # Cached context was gathered from the latent pages and merged with the new tokens.
    assert counts.get("mla_gather_cache", 0) > 0 and counts.get("merge_attention_states", 0) > 0
    assert_mla_ops_ran_per_layer(counts)


def test_tensor_parallel_2_matches_tp1(deepseek_v2, deepseek_v2_tp1, tmp_path):
    """Heads, the MoE experts and the shared expert split over two emulated XPUs."""
    env = emulation_env(tmp_path / "ops", VLLM_KUNLUN_EMULATED_DEVICES="2")
    tp2 = run_generation(deepseek_v2, PROMPTS, MAX_TOKENS, env=env,
                         tensor_parallel_size=2)  # fmt: skip
    assert tp2["token_ids"] == deepseek_v2_tp1["token_ids"]
    assert read_op_stats(tmp_path / "ops").get("mla_decode", 0) > 0


def test_compile_mode_matches_transformers(deepseek_v2, tmp_path):
    """vLLM's default torch.compile path: the MLA layer runs inside the compiled graph's pieces
    with the plugin's ops, as in eager mode."""
    stats_dir = tmp_path / "ops"
    result = run_generation(deepseek_v2, PROMPTS[:4], 16, env=emulation_env(stats_dir),
                            enforce_eager=False)  # fmt: skip
    assert result["token_ids"] == hf_greedy(deepseek_v2, PROMPTS[:4], 16)
    counts = read_op_stats(stats_dir)
    assert counts.get("mla_decode", 0) > 0 and counts.get("concat_and_cache_mla", 0) > 0, counts


def test_fp8_kv_cache_is_refused_at_start_up(deepseek_v2):
    with pytest.raises(AssertionError, match="--kv-cache-dtype fp8 is not supported"):
        run_generation(deepseek_v2, PROMPTS[:1], 2, env=emulation_env(), kv_cache_dtype="fp8")


def test_kunlun_binding_runs_deepseek_v3_and_refuses_other_latent_sizes(
    tiny_model_factory, tmp_path
):
    """Through the stand-in kunlun_ops (tests/standin): DeepSeek-V3's MLA ops reach the recorded
    Kunlun kernels and give transformers' tokens; a model whose latent is not 512 + 64 is
    refused at start-up naming its sizes (the recorded kernels take no other)."""
    from tests.test_kunlun_provider_engine import MAX_TOKENS as STANDIN_TOKENS
    from tests.test_kunlun_provider_engine import generate

    model = tiny_model_factory("deepseek-v3")
    result, ops, calls = generate(model, "kunlun", tmp_path)
    assert_same_tokens(result["token_ids"], hf_greedy(model, PROMPTS, STANDIN_TOKENS))
    assert calls["concat_and_cache_mla"] == ops["concat_and_cache_mla"]
    assert calls["paged_attention"] == ops["mla_decode"]
    # No prefix hits or chunked prompts here: every prefill is the new tokens' causal kernel.
    assert calls["attention"] == ops["mla_prefill"]

    with pytest.raises(AssertionError, match="kv_lora_rank 64 and rope dim 16"):
        generate(tiny_model_factory("deepseek-v2"), "kunlun", tmp_path / "v2")
