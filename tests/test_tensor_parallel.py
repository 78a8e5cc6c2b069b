"""Tensor parallelism through the plugin on emulated XPUs: multiprocessing and Ray executors.

Greedy float32 output with TP > 1 must equal TP 1 token for token, and every rank must have
run the plugin's kernels and the Kunlun communicator (op accounting, one file per rank). The
default model has 9 attention heads, so it cannot be split over 2 XPUs (tested as an error);
it runs with TP 3 instead. Start-up errors for a bad TP size come from the config, before any
weights load.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine import PROMPTS, REPO, emulation_env, run_generation

PROMPTS_4 = PROMPTS[:4]
MAX_TOKENS = 16


def rank_stats(directory: Path) -> dict[int, dict[str, int]]:
    """Op counts per worker rank, from the ops-rank<r>-<pid>.json files."""
    by_rank = {}
    for path in directory.glob("ops-rank*-*.json"):
        rank = int(re.match(r"ops-rank(\d+)-", path.name).group(1))
        by_rank[rank] = json.loads(path.read_text())
    return by_rank


def assert_every_rank_ran_plugin_ops(directory: Path, ranks: int) -> None:
    by_rank = rank_stats(directory)
    assert sorted(by_rank) == list(range(ranks)), f"stats files: {sorted(by_rank)}"
    for rank, counts in by_rank.items():
        attention = counts.get("prefill_attention", 0) + counts.get("decode_attention", 0)
        norms = counts.get("rms_norm", 0) + counts.get("fused_add_rms_norm", 0)
        assert attention > 0 and norms > 0 and counts.get("silu_and_mul", 0) > 0, (rank, counts)
        assert counts.get("comm.all_reduce", 0) > 0, (rank, counts)  # the Kunlun communicator


@pytest.fixture(scope="module")
def qwen3(tiny_model_factory) -> Path:
    return tiny_model_factory("qwen3")


@pytest.fixture(scope="module")
def qwen3_tp1(qwen3) -> list[list[int]]:
    return run_generation(qwen3, PROMPTS_4, MAX_TOKENS, env=emulation_env())["token_ids"]


def test_tp2_multiprocessing_matches_tp1_with_both_ranks_on_their_own_xpu(
    qwen3, qwen3_tp1, tmp_path
):
    # Four emulated XPUs, of which 2 and 3 are visible: rank r binds to the r-th visible one.
    env = emulation_env(tmp_path, VLLM_KUNLUN_EMULATED_DEVICES="4", XPU_VISIBLE_DEVICES="2,3")
    result = run_generation(qwen3, PROMPTS_4, MAX_TOKENS, env=env, tensor_parallel_size=2,
                            distributed_executor_backend="mp")  # fmt: skip
    assert result["platform"] == "EmulatedKunlunPlatform"
    assert result["token_ids"] == qwen3_tp1
    assert_every_rank_ran_plugin_ops(tmp_path, ranks=2)
    assert "Worker 0 runs on emulated XPU 2" in result["log"]
    assert "Worker 1 runs on emulated XPU 3" in result["log"]
    assert re.search(r"Emulated XPU 3: 2\.00 GiB total", result["log"])  # its own budget


def test_tp2_on_ray_matches_tp1(qwen3, qwen3_tp1, monkeypatch):
    ray = pytest.importorskip("ray")
    env = emulation_env(VLLM_KUNLUN_EMULATED_DEVICES="2")
    # Ray's worker processes inherit the environment of the Ray instance, so the emulated
    # XPUs are declared before it starts: two of them, advertised as Ray GPUs.
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    context = ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        address = context.address_info["gcs_address"]
        result = run_generation(
            qwen3, PROMPTS_4, MAX_TOKENS,
            env={**env, "RAY_ADDRESS": address, "RAY_DEDUP_LOGS": "0"},
            tensor_parallel_size=2, distributed_executor_backend="ray",
        )  # fmt: skip
    finally:
        ray.shutdown()
    assert result["platform"] == "EmulatedKunlunPlatform"
    assert f"Connecting to existing Ray cluster at address: {address}" in result["log"]
    assert "Worker 0 runs on emulated XPU 0" in result["log"]
    assert "Worker 1 runs on emulated XPU 1" in result["log"]
    assert result["token_ids"] == qwen3_tp1


def test_default_model_tp3_matches_tp1(default_model, tmp_path):
    # 9 query heads and 3 KV heads: TP 3 is the smallest split of the default model.
    tp1 = run_generation(default_model, PROMPTS_4, 8, env=emulation_env())
    env = emulation_env(tmp_path, VLLM_KUNLUN_EMULATED_DEVICES="3")
    tp3 = run_generation(default_model, PROMPTS_4, 8, env=env, tensor_parallel_size=3,
                         distributed_executor_backend="mp")  # fmt: skip
    assert tp3["token_ids"] == tp1["token_ids"]
    assert_every_rank_ran_plugin_ops(tmp_path, ranks=3)


# Start-up errors -----------------------------------------------------------------------------

# Each case builds an LLM the way a user would; all fail while the config is checked, before an
# engine or weights exist, so one process runs them all.
ERROR_PROBE = """
import json, os, sys
from vllm import LLM

messages = []
for env, model, tp in json.loads(sys.argv[1]):
    for key in ("VLLM_KUNLUN_EMULATED_DEVICES", "XPU_VISIBLE_DEVICES"):
        os.environ.pop(key, None)
    os.environ.update(env)
    try:
        LLM(model=model, tensor_parallel_size=tp, enforce_eager=True, max_model_len=512)
        messages.append(None)
    except Exception as error:
        messages.append(f"{type(error).__name__}: {error}")
print("MESSAGES " + json.dumps(messages))
"""


def test_bad_tensor_parallel_sizes_fail_at_start_up_with_what_to_do(default_model, qwen3):
    cases = [
        ({"VLLM_KUNLUN_EMULATED_DEVICES": "2"}, str(default_model), 2),
        ({}, str(qwen3), 2),
        ({"VLLM_KUNLUN_EMULATED_DEVICES": "4", "XPU_VISIBLE_DEVICES": "3"}, str(qwen3), 2),
        ({"VLLM_KUNLUN_EMULATED_DEVICES": "many"}, str(qwen3), 2),
    ]
    child_env = {**os.environ, **emulation_env()}
    proc = subprocess.run([sys.executable, "-c", ERROR_PROBE, json.dumps(cases)], cwd=REPO,
                          env=child_env, capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MESSAGES ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    heads, one_device, hidden, bad_count = json.loads(lines[-1][len("MESSAGES ") :])

    # vLLM's own check, surfacing unchanged through the plugin.
    assert "Total number of attention heads (9) must be divisible by tensor parallel size (2)" in (
        heads or ""
    )
    # The plugin's: how many XPUs are needed and visible, and which variable to change.
    assert one_device is not None
    assert "--tensor-parallel-size 2 x --pipeline-parallel-size 1 needs 2 Kunlun XPUs" in (
        one_device
    )
    assert "only 1 is visible" in one_device
    assert "VLLM_KUNLUN_EMULATED_DEVICES=1" in one_device
    assert "set VLLM_KUNLUN_EMULATED_DEVICES=2" in one_device
    assert hidden is not None and "only 1 is visible (XPU_VISIBLE_DEVICES=3)" in hidden
    assert "emulates VLLM_KUNLUN_EMULATED_DEVICES=4 XPU(s): unset or widen XPU_VISIBLE_DEVICES" in (
        hidden
    )
    assert bad_count is not None and "VLLM_KUNLUN_EMULATED_DEVICES='many'" in bad_count
