"""Serving latency: `vllm bench serve` against an OpenAI server started per backend."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from benchmarks.processes import TreeMemorySampler

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the server at {url} was not healthy after {timeout_s:.0f} s")


def run_serving(
    workloads: list[ServingWorkload],
    backend: str,
    model: Path,
    workdir: Path,
    runs: int,
    vllm_cli: list[str],
    env: dict[str, str],
) -> dict[str, list[dict[str, float]]]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = workdir / f"server-{backend}.log"
    server_cmd = [*vllm_cli, "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
                  "--enforce-eager", "--kv-cache-memory-bytes", KV_CACHE,
                  "--max-model-len", "2048"]  # fmt: skip
    results: dict[str, list[dict[str, float]]] = {}
    with log.open("w") as log_file:
        server = subprocess.Popen(server_cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
    try:
        with TreeMemorySampler(server.pid) as sampler:
            _wait_healthy(url, server)
            for workload in workloads:
                for i in range(runs):
                    result = _bench_serve(workload, model, url, workdir, vllm_cli, env, i)
                    result["peak RSS GiB"] = sampler.peak / (1 << 30)
                    results.setdefault(workload.name, []).append(result)
    except RuntimeError as error:
        raise RuntimeError(f"{error}; server log:\n{log.read_text()[-4000:]}") from None
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
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
