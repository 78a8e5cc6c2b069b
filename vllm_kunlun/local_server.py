"""Run an OpenAI-compatible vLLM server on 127.0.0.1 for the length of a `with` block.

Used by `make demo`, the benchmarks and the tests: it picks a free port, waits until /health
answers, and stops the server's whole process group on exit (SIGTERM, then SIGKILL).
"""

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """`command` is everything before `--host/--port`, e.g. [vllm-kunlun, serve, MODEL, ...]."""

    def __init__(
        self,
        command: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        startup_timeout_s: float = 900,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [*command, "--host", "127.0.0.1", "--port", str(self.port)]
        self.log_path, self.env, self.startup_timeout_s = log_path, env, startup_timeout_s
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "LocalServer":
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_until_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the server exited with status {self.process.returncode}; its log ends:\n"
                    f"{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(
            f"the server at {self.url} was not healthy after {self.startup_timeout_s:.0f} s; "
            f"see {self.log_path}"
        )

    def stop(self, timeout_s: float = 60) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
