"""Expert parallelism for MoE models on emulated XPUs, multiprocessing and Ray.

- Tensor parallel 2 with --enable-expert-parallel: each rank holds half the experts (vLLM's
  expert map) and the ranks' partial outputs are all-reduced; no all-to-all.
- Data parallel 2 with --enable-expert-parallel, launched offline the SPMD way on Ray (one
  engine per data-parallel rank, each with its own prompts) and by `vllm-kunlun serve
  --data-parallel-size 2` on multiprocessing (two engines behind one server): every MoE
  layer gathers both ranks' tokens through the `ep` group's all-to-all (vLLM's
  allgather_reducescatter manager over the Kunlun communicator's all_gatherv), runs this
  rank's experts on them, and hands each rank back its tokens' sums with reduce_scatterv.
  Offline, the ranks get different numbers of prompts, so the variable-size collectives see
  different row counts.

Greedy float32 output equals the single-XPU run token for token. Offline, every rank's op
accounting shows the plugin's MoE ops (and, with data parallelism, the all-to-all) ran; the
server's workers are stopped by a signal, so there the log shows each engine's XPU and rank.

GLM-4.5 MoE is the model: grouped sigmoid routing with a correction bias, a shared expert and a
dense first layer, so every MoE path runs under expert parallelism.
"""

import os
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.engine import PROMPTS, emulation_env, run_generation
from tests.test_tensor_parallel import rank_stats
from vllm_kunlun.local_server import LocalServer

pytestmark = pytest.mark.engine

PROMPTS_4 = PROMPTS[:4]
MAX_TOKENS = 12
#: The prompts of data-parallel rank 0 and rank 1: uneven on purpose.
DP_SHARES = (PROMPTS_4[:3], PROMPTS_4[3:])
MOE_OPS = ("moe_grouped_topk", "moe_experts")
ALL_TO_ALL = ("comm.dispatch_router_logits", "comm.combine", "comm.all_gatherv",
              "comm.reduce_scatterv")  # fmt: skip


@pytest.fixture(scope="module")
def glm4_moe(tiny_model_factory) -> Path:
    return tiny_model_factory("glm4-moe")


@pytest.fixture(scope="module")
def single_xpu(glm4_moe) -> list[list[int]]:
    return run_generation(glm4_moe, PROMPTS_4, MAX_TOKENS, env=emulation_env())["token_ids"]


def assert_every_rank_ran_moe_ops(directory: Path, ranks: int, collectives: tuple[str, ...]):
    by_rank = rank_stats(directory)
    assert sorted(by_rank) == list(range(ranks)), f"stats files: {sorted(by_rank)}"
    for rank, counts in by_rank.items():
        missing = [name for name in MOE_OPS + collectives if not counts.get(name)]
        assert not missing, (rank, missing, counts)
        # One all-to-all per MoE layer per step: as often as the experts op.
        for name in set(collectives) & {"comm.dispatch_router_logits", "comm.combine"}:
            assert counts[name] == counts["moe_experts"], (rank, counts)


@pytest.fixture
def ray_cluster(monkeypatch, tmp_path):
    """A Ray instance with two emulated XPUs as its GPUs, whose workers write op accounting
    to tmp_path; yields its address."""
    ray = pytest.importorskip("ray")
    # Ray's worker processes inherit the environment of the Ray instance, so the emulated
    # XPUs (and where op counts go) are declared before it starts.
    for key, value in emulation_env(tmp_path, VLLM_KUNLUN_EMULATED_DEVICES="2").items():
        monkeypatch.setenv(key, value)
    context = ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()


def test_tp2_expert_parallel_multiprocessing_matches_one_xpu(glm4_moe, single_xpu, tmp_path):
    env = emulation_env(tmp_path, VLLM_KUNLUN_EMULATED_DEVICES="2")
    result = run_generation(glm4_moe, PROMPTS_4, MAX_TOKENS, env=env, tensor_parallel_size=2,
                            enable_expert_parallel=True,
                            distributed_executor_backend="mp")  # fmt: skip
    assert result["platform"] == "EmulatedKunlunPlatform"
    assert result["token_ids"] == single_xpu
    assert_every_rank_ran_moe_ops(tmp_path, ranks=2, collectives=("comm.all_reduce",))
    assert "Worker 1 runs on emulated XPU 1" in result["log"]


def test_tp2_expert_parallel_on_ray_matches_one_xpu(glm4_moe, single_xpu, ray_cluster, tmp_path):
    env = emulation_env(tmp_path, VLLM_KUNLUN_EMULATED_DEVICES="2", RAY_ADDRESS=ray_cluster,
                        RAY_DEDUP_LOGS="0")  # fmt: skip
    result = run_generation(glm4_moe, PROMPTS_4, MAX_TOKENS, env=env, tensor_parallel_size=2,
                            enable_expert_parallel=True,
                            distributed_executor_backend="ray")  # fmt: skip
    assert f"Connecting to existing Ray cluster at address: {ray_cluster}" in result["log"]
    assert result["token_ids"] == single_xpu
    assert_every_rank_ran_moe_ops(tmp_path, ranks=2, collectives=("comm.all_reduce",))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_data_parallel(model: Path, stats_dir: Path, **extra) -> list[dict]:
    """Both data-parallel ranks at once, each an engine of its own (vLLM's offline SPMD launch:
    VLLM_DP_RANK / VLLM_DP_SIZE / VLLM_DP_MASTER_*), each generating for its share."""
    port = _free_port()
    ray_address = extra.pop("ray_address", None)
    results: list[dict | AssertionError] = [AssertionError("not run")] * 2

    def run_rank(rank: int) -> None:
        env = emulation_env(stats_dir, VLLM_KUNLUN_EMULATED_DEVICES="2",
                            VLLM_DP_RANK=str(rank), VLLM_DP_RANK_LOCAL=str(rank),
                            VLLM_DP_SIZE="2", VLLM_DP_MASTER_IP="127.0.0.1",
                            VLLM_DP_MASTER_PORT=str(port))  # fmt: skip
        if ray_address:
            env.update(RAY_ADDRESS=ray_address, RAY_DEDUP_LOGS="0")
        try:
            results[rank] = run_generation(model, DP_SHARES[rank], MAX_TOKENS, env=env,
                                           enable_expert_parallel=True, **extra)  # fmt: skip
        except AssertionError as error:
            results[rank] = error

    threads = [threading.Thread(target=run_rank, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, AssertionError):
            raise result
    return results


def test_dp2_expert_parallel_all_to_all_on_ray_matches_one_xpu(
    glm4_moe, single_xpu, ray_cluster, tmp_path
):
    ranks = run_data_parallel(glm4_moe, tmp_path, ray_address=ray_cluster,
                              distributed_executor_backend="ray")  # fmt: skip
    for rank in ranks:
        assert f"Connecting to existing Ray cluster at address: {ray_cluster}" in rank["log"]
    assert ranks[0]["token_ids"] == single_xpu[:3]
    assert ranks[1]["token_ids"] == single_xpu[3:]
    assert_every_rank_ran_moe_ops(tmp_path, ranks=2, collectives=ALL_TO_ALL)


def test_serve_with_data_parallel_expert_parallel_matches_one_xpu(glm4_moe, single_xpu, tmp_path):
    """`vllm-kunlun serve --data-parallel-size 2 --enable-expert-parallel`: two engines, each
    on its own emulated XPU, behind one server; concurrent greedy requests (spread over both
    engines) get the single-XPU tokens."""
    command = [str(Path(sys.executable).with_name("vllm-kunlun")), "serve", str(glm4_moe),
               "--emulate", "--enforce-eager", "--max-model-len", "512", "--dtype", "float32",
               "--served-model-name", "moe", "--data-parallel-size", "2",
               "--enable-expert-parallel"]  # fmt: skip
    env = {**os.environ, **emulation_env(VLLM_KUNLUN_EMULATED_DEVICES="2")}
    server = LocalServer(command, tmp_path / "server.log", env=env, startup_timeout_s=600)

    def complete(prompt: str) -> list[int]:
        request = {"model": "moe", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                   "ignore_eos": True, "return_token_ids": True}  # fmt: skip
        response = httpx.post(f"{server.url}/v1/completions", json=request, timeout=300)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["token_ids"]

    with server, ThreadPoolExecutor(len(PROMPTS_4)) as pool:
        token_ids = list(pool.map(complete, PROMPTS_4))
    assert token_ids == single_xpu
    log = (tmp_path / "server.log").read_text()
    assert "Worker 0 runs on emulated XPU 0" in log and "Worker 0 runs on emulated XPU 1" in log
    assert "as DP rank 1" in log and "EP rank 1" in log
