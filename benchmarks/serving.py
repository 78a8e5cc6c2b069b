"""Serving latency: `vllm bench serve` against an OpenAI server started per backend."""

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.processes import TreeMemorySampler
from vllm_kunlun.local_server import LocalServer

KV_CACHE = "2G"
METRICS = ("p50_ttft_ms", "p99_ttft_ms", "p50_itl_ms", "p99_itl_ms")


@dataclass
class ServingWorkload:
    concurrency: int
    input_len: int
    output_len: int
    num_prompts: int

    @property
    def name(self) -> str:
        return f"serving c={self.concurrency} {self.input_len}/{self.output_len} eager"


def run_serving(
    workloads: list[ServingWorkload],
    backend: str,
    model: Path,
    workdir: Path,
    runs: int,
    vllm_cli: list[str],
    env: dict[str, str],
) -> dict[str, list[dict[str, float]]]:
    server_cmd = [*vllm_cli, "serve", str(model), "--enforce-eager",
                  "--kv-cache-memory-bytes", KV_CACHE, "--max-model-len", "2048"]  # fmt: skip
    server = LocalServer(server_cmd, workdir / f"server-{backend}.log", env=env)
    results: dict[str, list[dict[str, float]]] = {}
    with server, TreeMemorySampler(server.process.pid) as sampler:
        for workload in workloads:
            for i in range(runs):
                result = _bench_serve(workload, model, server.url, workdir, vllm_cli, env, i)
                result["peak RSS GiB"] = sampler.peak / (1 << 30)
                results.setdefault(workload.name, []).append(result)
    return results


def _bench_serve(
    workload: ServingWorkload,
    model: Path,
    url: str,
    workdir: Path,
    vllm_cli: list[str],
    env: dict[str, str],
    run_index: int,
) -> dict[str, float]:
    filename = f"serve-{workload.concurrency}-{run_index}-{time.monotonic_ns()}.json"
    command = [
        *vllm_cli, "bench", "serve", "--backend", "vllm", "--base-url", url,
        "--model", str(model), "--dataset-name", "random",
        "--random-input-len", str(workload.input_len),
        "--random-output-len", str(workload.output_len),
        "--num-prompts", str(workload.num_prompts),
        "--max-concurrency", str(workload.concurrency), "--ignore-eos", "--seed", str(run_index),
        "--percentile-metrics", "ttft,itl", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(workdir), "--result-filename", filename,
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    path = workdir / filename
    if proc.returncode != 0 or not path.exists():
        raise RuntimeError(f"bench serve failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    data = json.loads(path.read_text())
    return {metric.replace("_", " "): float(data[metric]) for metric in METRICS}
