"""`vllm-kunlun plan` against what the engine allocates on emulated XPUs.

For the default model, a tiny dense, MoE and MLA model, at TP 1 and 2 (the MoE one with expert
parallelism at TP 2), and a 4-bit dense and a W8A8 MoE checkpoint, one engine each reports per
worker what its emulated XPU holds (kunlun_memory_report) and the KV-cache blocks it allocated.
Then:

- the planned weight bytes equal the bytes every worker's emulated XPU recorded after loading
  (quantized checkpoints: up to KV_PLACEHOLDER_BYTES per layer more, explained below);
- planned with the engine's KV budget (--kv-cache-memory-bytes), the KV block count and token
  capacity equal the engine's, and the engine's KV tensors are exactly blocks x the plan's
  bytes per block;
- planned from --gpu-memory-utilization, the plan uses its activation ESTIMATE where the engine
  measured the emulated device's peak: the estimate is never below the measurement, so the
  plan's blocks never exceed the engine's, and the difference is exactly the estimate's excess
  in blocks (the explained difference; docs/plan.md).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine import REPO, emulation_env, run_generation
from vllm_kunlun.model_zoo.quantized import quantized_checkpoint

pytestmark = pytest.mark.engine

ENGINE = dict(max_model_len=1024, max_num_seqs=16, max_num_batched_tokens=1024)
#: (name, model, quantization scheme, tensor parallel size, expert parallel)
CASES = [
    ("default", "default", None, 1, False),
    ("llama", "llama", None, 1, False),
    ("llama-tp2", "llama", None, 2, False),
    ("llama-w4a16", "llama", "w4a16", 1, False),
    ("qwen3-moe", "qwen3-moe", None, 1, False),
    ("qwen3-moe-tp2-ep", "qwen3-moe", None, 2, True),
    ("qwen3-moe-w8a8", "qwen3-moe", "w8a8-dynamic", 1, False),
    ("deepseek-v3", "deepseek-v3", None, 1, False),
    ("deepseek-v3-tp2", "deepseek-v3", None, 2, False),
]
#: Per attention layer, at most: compressed-tensors checkpoints' KV-cache placeholders (zero
#: points) that vLLM drops after loading, in a step that reads the scales' values, which the
#: meta device has not: the plan counts them (it says so in kept_as_loaded).
KV_PLACEHOLDER_BYTES = 16
TINY_LAYERS = 2
MEMORY_GIB = "2"
NAMES = [case[0] for case in CASES]


def plan_argv(model: str, tp: int, ep: bool, *extra: str) -> list[str]:
    argv = [model, "--dtype", "bfloat16", "-tp", str(tp), "--device", "emulated",
            "--no-suggestions", *extra]  # fmt: skip
    for name, value in ENGINE.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv + (["--enable-expert-parallel"] if ep else [])


def run_plans(calls: list[list[str]]) -> list[dict]:
    env = {**os.environ, "VLLM_KUNLUN_EMULATE": "1", "VLLM_KUNLUN_EMULATED_MEMORY_GIB": MEMORY_GIB}
    proc = subprocess.run([sys.executable, "-m", "tests.plan_probe", json.dumps(calls)], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env=env)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def engine_budget(memory: dict, utilization: float) -> int:
    """The KV budget the emulated workers computed (vllm_kunlun/worker/emulated.py); the engine
    sizes the cache for the smallest."""
    return min(int(w["total"] * utilization) - w["weights"] - w["activations"]
               for w in memory["workers"])  # fmt: skip


@pytest.fixture(scope="module")
def measured(tiny_model_factory, default_model, tmp_path_factory) -> dict[str, dict]:
    quantized_root = tmp_path_factory.mktemp("plan-quantized")
    results = {}
    for name, arch, scheme, tp, ep in CASES:
        model = str(default_model if arch == "default" else tiny_model_factory(arch))
        if scheme is not None:
            model = str(quantized_checkpoint(Path(model), scheme, quantized_root))
        env = emulation_env(VLLM_KUNLUN_EMULATED_MEMORY_GIB=MEMORY_GIB,
                            VLLM_KUNLUN_EMULATED_DEVICES=str(tp))  # fmt: skip
        engine = run_generation(model, ["The capital of France is", "Once upon a time"], 2,
                                env=env, dtype="bfloat16", in_process=True, memory=True,
                                tensor_parallel_size=tp, enable_expert_parallel=ep,
                                **ENGINE)  # fmt: skip
        results[name] = {"model": model, "tp": tp, "ep": ep, "scheme": scheme,
                         "memory": engine["memory"]}  # fmt: skip
    plans = run_plans([plan_argv(r["model"], r["tp"], r["ep"]) for r in results.values()])
    for result, plan in zip(results.values(), plans, strict=True):
        result["plan"] = plan
        # vLLM's default --gpu-memory-utilization, as both the engine and the plan took it.
        utilization = plan["plan"]["gpu_memory_utilization"]
        result["budget"] = engine_budget(result["memory"], utilization)
    with_budget = run_plans([
        plan_argv(r["model"], r["tp"], r["ep"], "--kv-cache-memory-bytes", str(r["budget"]))
        for r in results.values()
    ])  # fmt: skip
    for result, plan in zip(results.values(), with_budget, strict=True):
        result["plan_with_budget"] = plan
    return results


@pytest.mark.parametrize("name", NAMES)
def test_planned_weights_equal_the_emulated_devices_record(measured, name):
    result = measured[name]
    plan = result["plan"]
    assert plan["code"] == 0, plan["stderr"]
    workers = result["memory"]["workers"]
    assert len(workers) == result["tp"]
    planned = plan["plan"]["weight_bytes"][0]
    if result["scheme"] is None:
        assert [w["weights"] for w in workers] == [planned] * result["tp"]
        assert plan["plan"]["kept_as_loaded"] == []
    else:
        assert plan["plan"]["kept_as_loaded"] == ["CompressedTensorsKVCacheMethod"]
        for worker in workers:
            assert 0 <= planned - worker["weights"] <= KV_PLACEHOLDER_BYTES * TINY_LAYERS


@pytest.mark.parametrize("name", NAMES)
def test_planned_kv_blocks_equal_the_engines_for_its_budget(measured, name):
    result = measured[name]
    plan = result["plan_with_budget"]["plan"]
    engine = result["memory"]
    assert plan["kv"]["blocks"] == engine["num_gpu_blocks"]
    assert plan["kv"]["tokens"] == engine["kv_cache_size_tokens"]
    for worker in engine["workers"]:
        assert worker["kv_cache"] == engine["num_gpu_blocks"] * plan["kv"]["bytes_per_block"]
        assert worker["in_use"] == worker["weights"] + worker["kv_cache"]


@pytest.mark.parametrize("name", NAMES)
def test_planned_kv_blocks_differ_only_by_the_activation_estimate(measured, name):
    result = measured[name]
    plan = result["plan"]["plan"]
    engine = result["memory"]
    measured_peak = max(w["activations"] for w in engine["workers"])
    assert plan["activation_bytes"][0] >= measured_peak  # a conservative estimate
    blocks, engine_blocks = plan["kv"]["blocks"], engine["num_gpu_blocks"]
    assert 0 < blocks <= engine_blocks
    excess = (result["budget"] - plan["kv_budget_bytes"][0]) / plan["kv"]["bytes_per_block"]
    assert abs((engine_blocks - blocks) - excess) <= 1
    assert (engine_blocks - blocks) / engine_blocks <= 0.02  # within 2% at these settings
    print(
        f"{name}: planned {blocks} blocks, engine {engine_blocks} "
        f"({(engine_blocks - blocks) / engine_blocks:.1%} fewer, the activation estimate)"
    )


def test_the_default_model_cannot_be_split_in_two(measured):
    result = run_plans([plan_argv(measured["default"]["model"], 2, False)])[0]
    assert result["code"] == 2
    assert "must be divisible by tensor parallel size (2)" in result["stderr"]
