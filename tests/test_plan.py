"""`vllm-kunlun plan` from config files: figures against plain formulas, verdicts, suggestions
that really fit, bad input, and the serve supervisor's memory advice.

The plans run in one fresh process (tests.plan_probe); the figures are checked against
arithmetic written here from the configs (parameter counts, KV bytes per token, block counts),
not against the plan's own code.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine import REPO

pytestmark = pytest.mark.engine

DATA = REPO / "tests" / "data" / "plan"
QWEN3_8B = str(DATA / "qwen3-8b")
QWEN3_30B = str(DATA / "qwen3-30b-a3b")
DEEPSEEK_V3 = str(DATA / "deepseek-v3")
GiB = 1 << 30
P800_BYTES = 96 * 10**9
#: Bytes of an attention layer's KV scales (six float32 scalars: q, k, v, prob, k/v on host).
KV_SCALES = 24


def run_plans(calls: list[list[str]], env: dict[str, str] | None = None) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "tests.plan_probe", json.dumps(calls)],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, **(env or {})})  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def config(folder: str) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def qwen3_parameters(c: dict) -> int:
    """Parameters of a Qwen3 dense model or Qwen3-MoE model from its config."""
    h, d, layers = c["hidden_size"], c["head_dim"], c["num_hidden_layers"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    attention = h * q + 2 * h * kv + q * h + 2 * d  # q, k, v, o and the q/k norms
    if "num_experts" in c:
        mlp = c["num_experts"] * 3 * h * c["moe_intermediate_size"] + c["num_experts"] * h
    else:
        mlp = 3 * h * c["intermediate_size"]
    return 2 * c["vocab_size"] * h + layers * (attention + mlp + 2 * h) + h


def deepseek_v3_parameters(c: dict) -> int:
    h, heads, layers = c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"]
    nope, rope, v = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    q_rank, kv_rank = c["q_lora_rank"], c["kv_lora_rank"]
    attention = (h * q_rank + q_rank + q_rank * heads * (nope + rope)
                 + h * (kv_rank + rope) + kv_rank + kv_rank * heads * (nope + v)
                 + heads * v * h)  # fmt: skip
    experts, moe_i = c["n_routed_experts"], c["moe_intermediate_size"]
    dense = c["first_k_dense_replace"]
    shared = c["n_shared_experts"] * 3 * h * moe_i
    moe = experts * 3 * h * moe_i + shared + experts * h
    return (2 * c["vocab_size"] * h + layers * (attention + 2 * h)
            + dense * 3 * h * c["intermediate_size"] + (layers - dense) * moe + h)  # fmt: skip


def rotary_cache_bytes(c: dict, rotary_dim: int) -> int:
    """vLLM's cos/sin cache (one, shared by the layers): positions x rotary dims, bf16."""
    return c["max_position_embeddings"] * rotary_dim * 2


def blocks_for(budget: int, kv_per_token: int, block_size: int = 64) -> int:
    return budget // (kv_per_token * block_size)


CALLS = {
    "qwen3-8b": ["--config", QWEN3_8B],
    "qwen3-8b-pp2": ["--config", QWEN3_8B, "-pp", "2", "--no-suggestions"],
    "qwen3-30b-tp2": ["--config", QWEN3_30B, "-tp", "2"],
    "qwen3-30b-tp2-ep": ["--config", QWEN3_30B, "-tp", "2", "--enable-expert-parallel",
                         "--no-suggestions"],
    "qwen3-8b-20gib": ["--config", QWEN3_8B, "--device-memory-gib", "20"],
    "deepseek-v3": ["--config", DEEPSEEK_V3],
    "deepseek-v3-strict": ["--config", DEEPSEEK_V3, "--strict", "--no-suggestions"],
    "deepseek-v3-tp32": ["--config", DEEPSEEK_V3, "-tp", "32", "--no-suggestions"],
    "deepseek-v3-pp32": ["--config", DEEPSEEK_V3, "-pp", "32", "--no-suggestions"],
    "deepseek-v3-tp16": ["--config", DEEPSEEK_V3, "-tp", "16", "--no-suggestions"],
    "explicit-kv": ["--config", QWEN3_8B, "--kv-cache-memory-bytes", "10G",
                    "--max-model-len", "32K", "--no-suggestions"],
    "no-config": ["EMPTY"],
    "no-folder": ["/nonexistent/model"],
    "unknown-architecture": ["--config", "UNKNOWN"],
    "heads-not-divisible": ["--config", QWEN3_8B, "-tp", "3"],
}  # fmt: skip


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> dict[str, dict]:
    scratch = tmp_path_factory.mktemp("plan-input")
    (scratch / "empty").mkdir()
    unknown = scratch / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps(
        config(QWEN3_8B) | {"architectures": ["NoSuchModelForCausalLM"]}))  # fmt: skip
    replace = {"EMPTY": str(scratch / "empty"), "UNKNOWN": str(unknown)}
    calls = [[replace.get(a, a) for a in argv] for argv in CALLS.values()]
    return dict(zip(CALLS, run_plans(calls), strict=True))


def test_dense_model_figures_equal_the_formulas(plans):
    result = plans["qwen3-8b"]
    assert result["code"] == 0, result["stderr"]
    plan, c = result["plan"], config(QWEN3_8B)
    layers = c["num_hidden_layers"]
    expected = 2 * qwen3_parameters(c) + rotary_cache_bytes(c, c["head_dim"]) + KV_SCALES * layers
    assert plan["weight_bytes"] == [expected]
    kv_per_token = layers * 2 * c["num_key_value_heads"] * c["head_dim"] * 2
    assert plan["kv_bytes_per_token"] == [kv_per_token]
    budget = int(P800_BYTES * 0.92) - expected - plan["activation_bytes"][0]
    assert plan["kv_budget_bytes"] == [budget]
    blocks = blocks_for(budget, kv_per_token)
    assert plan["kv"]["blocks"] == blocks
    assert plan["kv"]["concurrency"] == pytest.approx(blocks / math.ceil(40960 / 64))
    assert plan["max_model_len"] == c["max_position_embeddings"]
    # vLLM's batch defaults for a 96 GB device that is not an A100 (vllm serve).
    assert (plan["max_num_batched_tokens"], plan["max_num_seqs"]) == (8192, 1024)
    assert plan["fits"] and plan["verdict"].startswith("fits")
    assert f"{blocks:,}" in result["stdout"] and "verdict: fits" in result["stdout"]


def test_activation_reserve_is_the_documented_estimate(plans):
    plan, c = plans["qwen3-8b"]["plan"], config(QWEN3_8B)
    widest = 2 * c["intermediate_size"]  # the gate_up projection
    per_token = (4 * c["hidden_size"] + 2 * widest) * 2
    sampler = 1024 * c["vocab_size"] * 4 * 2
    assert plan["activation_bytes"] == [8192 * per_token + sampler]


def test_pipeline_stages_split_the_layers(plans):
    whole, split = plans["qwen3-8b"]["plan"], plans["qwen3-8b-pp2"]["plan"]
    c = config(QWEN3_8B)
    rotary = rotary_cache_bytes(c, c["head_dim"])
    # Each stage holds half the layers and its own rotary cache; the embedding on the first,
    # the LM head and final norm on the last.
    assert sum(split["weight_bytes"]) == whole["weight_bytes"][0] + rotary
    embedding = c["vocab_size"] * c["hidden_size"] * 2
    assert split["weight_bytes"][1] - split["weight_bytes"][0] == c["hidden_size"] * 2
    assert split["weight_bytes"][0] > embedding
    assert split["kv_bytes_per_token"] == [whole["kv_bytes_per_token"][0] // 2] * 2


def test_moe_model_at_tp2_and_expert_parallel(plans):
    c = config(QWEN3_30B)
    rotary = rotary_cache_bytes(c, c["head_dim"])
    layers = c["num_hidden_layers"]
    h, vocab = c["hidden_size"], c["vocab_size"]
    # Replicated per rank: the norms, the q/k norms and the routers; the rest is halved.
    replicated = layers * (2 * h + 2 * c["head_dim"] + c["num_experts"] * h) + h
    sharded = qwen3_parameters(c) - replicated
    expected = sharded + 2 * replicated + rotary + KV_SCALES * layers
    # With expert parallelism each rank holds half the experts whole instead of every expert's
    # half: the same bytes, plus each layer's int32 map of global to local experts.
    expert_maps = layers * c["num_experts"] * 4
    for name, extra in (("qwen3-30b-tp2", 0), ("qwen3-30b-tp2-ep", expert_maps)):
        plan = plans[name]["plan"]
        assert plans[name]["code"] == 0, plans[name]["stderr"]
        assert plan["weight_bytes"] == [expected + extra], name
        kv_heads = c["num_key_value_heads"] // 2
        assert plan["kv_bytes_per_token"] == [layers * 2 * kv_heads * c["head_dim"] * 2]
        assert plan["fits"]
    assert vocab * h * 2 < expected


def test_mla_model_figures_and_a_deployment_that_does_not_fit(plans):
    result = plans["deepseek-v3"]
    assert result["code"] == 0  # a plan that does not fit is still a plan
    plan, c = result["plan"], config(DEEPSEEK_V3)
    layers = c["num_hidden_layers"]
    moe_layers = layers - c["first_k_dense_replace"]
    expected = (2 * deepseek_v3_parameters(c)
                + 4 * moe_layers * c["n_routed_experts"]  # the routers' float32 bias
                + rotary_cache_bytes(c, c["qk_rope_head_dim"]) + KV_SCALES * layers)  # fmt: skip
    assert plan["weight_bytes"] == [expected]
    assert deepseek_v3_parameters(c) == 671_026_404_352  # the published 671B
    # One latent row per token and layer: kv_lora_rank + rope dims, bf16.
    assert plan["kv_bytes_per_token"] == [layers * (512 + 64) * 2]
    assert not plan["fits"] and plan["kv"]["blocks"] == 0
    assert plan["verdict"].startswith("does not fit: weights")
    assert "verdict: does not fit" in result["stdout"]
    more = [s for s in plan["suggestions"] if s.startswith("more devices (32): ")]
    assert more and "--tensor-parallel-size 32 --pipeline-parallel-size 1" in more[0], more
    # More pipeline stages hold more requests: MLA's latent cache is not split by TP.
    assert "most requests: --tensor-parallel-size 1 --pipeline-parallel-size 32" in more[0]
    # The suggested deployments fit when planned; 16 devices do not.
    assert plans["deepseek-v3-tp32"]["plan"]["fits"] and plans["deepseek-v3-pp32"]["plan"]["fits"]
    assert not plans["deepseek-v3-tp16"]["plan"]["fits"]
    assert plans["deepseek-v3-strict"]["code"] == 1
    assert "does not fit" in plans["deepseek-v3-strict"]["stdout"]


def test_a_shorter_context_or_a_quantized_format_makes_it_fit(plans):
    plan = plans["qwen3-8b-20gib"]["plan"]
    assert not plan["fits"] and "the longest that fits is" in plan["verdict"]
    budget, per_block = plan["kv_budget_bytes"][0], plan["kv"]["bytes_per_block"]
    # vLLM keeps one block back (the null block), then one request must fit.
    longest = (budget - per_block) // per_block * 64
    assert plan["kv"]["longest_context"] == longest
    shorter = [s for s in plan["suggestions"] if s.startswith("shorter context")]
    assert shorter == [f"shorter context: --max-model-len {longest // 1024 * 1024}"]
    suggestions = plan["suggestions"]
    assert any(s.startswith("8-bit weights: about") for s in suggestions), suggestions
    assert any(s.startswith("more devices (2): --tensor-parallel-size 2") for s in suggestions)


def test_explicit_kv_cache_memory_and_human_readable_sizes(plans):
    plan = plans["explicit-kv"]["plan"]
    assert plan["kv_budget_bytes"] == [10 * GiB] and plan["max_model_len"] == 32 * 1024
    assert plan["kv"]["blocks"] == blocks_for(10 * GiB, plan["kv_bytes_per_token"][0])


@pytest.mark.parametrize("name, message", [
    ("no-config", "no config.json in this folder"),
    ("no-folder", "no such folder"),
    ("unknown-architecture", "NoSuchModelForCausalLM"),
    ("heads-not-divisible", "must be divisible by tensor parallel size (3)"),
])  # fmt: skip
def test_bad_input_is_one_line_and_status_2(plans, name, message):
    result = plans[name]
    assert result["code"] == 2 and result["plan"] is None
    lines = [line for line in result["stderr"].splitlines() if line.startswith("vllm-kunlun")]
    assert len(lines) == 1 and message in lines[0], result["stderr"]
    assert result["stdout"] == ""


def test_the_command_line_entry_point(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "-m", "vllm_kunlun.cli", "plan", "--config", QWEN3_8B,
                           "--no-suggestions", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "per device" in proc.stdout and json.loads(out.read_text())["fits"]


def test_serve_with_no_room_for_a_kv_cache_prints_the_plan(tiny_model_factory):
    """The emulated worker finds no room for a KV cache (its device is smaller than the
    weights); the supervisor adds the plan's verdict for the same deployment."""
    model = tiny_model_factory("llama")
    env = {**os.environ, "VLLM_KUNLUN_EMULATE": "1", "VLLM_KUNLUN_EMULATED_MEMORY_GIB": "0.02"}
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_kunlun.cli", "serve", str(model), "--port", "0",
         "--max-model-len", "1024", "--max-num-seqs", "4", "--max-num-batched-tokens", "256"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "leaving no room for a KV cache" in output
    advice = proc.stderr[proc.stderr.index("vllm-kunlun plan (") :]
    assert "--device emulated" in advice.splitlines()[0]
    assert "verdict: does not fit: weights" in advice
    # Two devices hold half the weights each (the embedding is split too), which leaves room.
    assert "more devices (2): --tensor-parallel-size 2 --pipeline-parallel-size 1" in advice


def test_serve_that_fails_for_memory_prints_the_plan(tiny_model_factory):
    """vLLM refuses a --max-model-len the KV cache cannot hold; the supervisor adds the plan,
    whose longest context equals the estimate in vLLM's own error."""
    model = tiny_model_factory("llama")
    env = {**os.environ, "VLLM_KUNLUN_EMULATE": "1", "VLLM_KUNLUN_EMULATED_MEMORY_GIB": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_kunlun.cli", "serve", str(model), "--kv-cache-memory-bytes",
         "1M", "--max-model-len", "2048", "--port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    vllm_estimate = re.search(r"estimated maximum model length is (\d+)", output)
    assert vllm_estimate, output[-3000:]
    assert "vllm-kunlun plan (vllm-kunlun plan" in proc.stderr
    assert (f"the longest that fits is {int(vllm_estimate.group(1)):,} tokens"
            in proc.stderr), proc.stderr[-2000:]  # fmt: skip
    assert "shorter context: --max-model-len" in proc.stderr


def test_serve_arguments_map_to_plan_arguments(default_model):
    from vllm_kunlun.plan.advice import plan_argv_for_serve

    argv = plan_argv_for_serve([str(default_model), "--port", "8000", "--max-model-len", "4k",
                                "-tp", "2", "--enforce-eager", "--kv-cache-memory-bytes=64M",
                                "--served-model-name", "x"])  # fmt: skip
    assert argv[0] == str(default_model)
    assert argv[1:-2] == ["--tensor-parallel-size", "2", "--max-model-len", "4000",
                          "--kv-cache-memory-bytes", str(64 << 20)]  # fmt: skip
    assert argv[-2] == "--device"
