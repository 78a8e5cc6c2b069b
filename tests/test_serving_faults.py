"""Faults while serving through the plugin: a dying engine or worker, and clients that hang up."""

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from benchmarks.soak import metric
from vllm_kunlun.local_server import LocalServer

pytestmark = pytest.mark.engine

SERVE = [str(Path(sys.executable).with_name("vllm-kunlun")), "serve", "--emulate",
         "--served-model-name", "default", "--enforce-eager",
         "--max-model-len", "1024"]  # fmt: skip
LONG_STREAM = {"model": "default", "prompt": "Once upon a time", "max_tokens": 800,
               "ignore_eos": True, "stream": True}  # fmt: skip


def kv_cache_usage(url: str) -> float:
    return metric(url, "vllm:kv_cache_usage_perc")


def usage_while_streaming(url: str, lines: Iterator[str], chunks: int) -> float:
    """The highest KV usage seen while reading `chunks` stream chunks (sampled after each one:
    the gauge follows engine steps, and one sample can land before the first step's update)."""
    samples = []
    while len(samples) < chunks:
        if next(lines).startswith("data: "):
            samples.append(kv_cache_usage(url))
    if max(samples) == 0.0:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        wanted = ("vllm:kv_cache_usage_perc", "vllm:num_requests")
        exported = [line for line in text.splitlines() if line.startswith(wanted)]
        raise AssertionError(f"no KV usage while a request streamed; /metrics: {exported}")
    return max(samples)


def process_named(server: LocalServer, name: str) -> psutil.Process:
    children = psutil.Process(server.process.pid).children(recursive=True)
    matches = [p for p in children if p.name() == name]
    assert matches, f"no {name} process under the server: {[p.name() for p in children]}"
    return matches[0]


def stream_in_background(url: str, errors: list[str], first_chunk: threading.Event) -> None:
    """Reads a long completion stream; records how it ended if it did not end normally."""
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=LONG_STREAM, timeout=60) as r:
            if r.status_code != 200:
                errors.append(f"HTTP {r.status_code}")
                return
            last = ""
            for line in r.iter_lines():
                if line.startswith("data: "):
                    first_chunk.set()
                    last = line
                if "error" in line.lower():
                    errors.append(line[:200])
                    return
            errors.append("done" if last == "data: [DONE]" else "stream ended without [DONE]")
    except httpx.HTTPError as error:
        errors.append(f"{type(error).__name__}: {error}")
    finally:
        first_chunk.set()


def test_client_disconnect_frees_its_kv_blocks_and_a_requested_stop_exits_0(tmp_path):
    server = LocalServer(SERVE, tmp_path / "server.log", startup_timeout_s=600)
    with server:
        idle = kv_cache_usage(server.url)
        with httpx.stream("POST", f"{server.url}/v1/completions", json=LONG_STREAM,
                          timeout=120) as response:  # fmt: skip
            busy = usage_while_streaming(server.url, response.iter_lines(), chunks=20)
        # Leaving the block closed the connection mid-stream.
        deadline = time.monotonic() + 30
        while kv_cache_usage(server.url) > idle and time.monotonic() < deadline:
            time.sleep(0.5)
        after = kv_cache_usage(server.url)
        assert busy > idle, f"a running request should hold KV blocks (idle {idle}, busy {busy})"
        assert after == idle, f"KV usage stayed at {after} after the client left (idle {idle})"
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    # LocalServer stops the server with SIGTERM: a requested stop is not a failure.
    assert server.process.returncode == 0, server.log_tail()


# One XPU's worker runs inside the engine process unless the multiprocessing executor (the one
# for several XPUs) is asked for.
@pytest.mark.parametrize("victim, executor", [("VLLM::Worker", "mp"), ("VLLM::EngineCore", "uni")])
def test_a_killed_engine_process_fails_requests_and_stops_the_server(victim, executor, tmp_path):
    command = [*SERVE, "--distributed-executor-backend", executor]
    server = LocalServer(command, tmp_path / "server.log", startup_timeout_s=600)
    with server:
        errors: list[str] = []
        streaming = threading.Event()
        clients = [
            threading.Thread(target=stream_in_background, args=(server.url, errors, streaming))
            for _ in range(3)
        ]
        for client in clients:
            client.start()
        assert streaming.wait(120), "no stream started"
        process_named(server, victim).kill()
        killed_at = time.monotonic()

        health_codes = []
        while server.process.poll() is None and time.monotonic() - killed_at < 30:
            try:
                health_codes.append(httpx.get(f"{server.url}/health", timeout=2).status_code)
            except httpx.HTTPError:
                health_codes.append(None)  # the server is going away
            time.sleep(0.5)
        exit_code = server.process.poll()
        for client in clients:
            client.join(timeout=30)

    assert exit_code is not None, f"the server still runs 30 s after its {victim} died"
    assert exit_code != 0, "the server should report the failure with a non-zero exit status"
    assert 200 not in health_codes[1:], f"/health kept answering 200: {health_codes}"
    assert len(errors) == 3 and "done" not in errors, f"clients should see errors: {errors}"
