"""`vllm-kunlun serve` as a supervisor: a server that stops on its own exits non-zero.

vLLM's API server shuts down cleanly (status 0) when its engine or a worker dies, so process
managers (systemd, Kubernetes, a shell script) cannot tell a crash from a requested stop. The
supervisor runs the server in a child process, forwards SIGINT/SIGTERM to it, and when the child
ends without having been asked to, reports the failure and exits with status 1.

The child's output passes through unchanged, line by line. When the engine failed to start for
memory, the supervisor adds `vllm-kunlun plan`'s verdict for the same deployment and the
smallest changes that make it fit (vllm_kunlun.plan.advice).
"""

import os
import signal
import subprocess
import sys
import threading
from typing import IO

#: Argument that marks the supervised child; `vllm-kunlun` removes it before running vLLM.
CHILD_FLAG = "--kunlun-supervised"
STOPPED_ON_ITS_OWN = (
    "vllm-kunlun: the server stopped without being asked to (its engine or a worker process "
    "died; see the log above). Exiting with status 1.\n"
)


class _PassThrough(threading.Thread):
    """Copies the child's stream to ours line by line, noting a memory failure on the way."""

    def __init__(self, source: IO[bytes], target: IO[bytes]) -> None:
        super().__init__(daemon=True)
        self.source, self.target = source, target
        self.memory_failure = False

    def run(self) -> None:
        from vllm_kunlun.plan.advice import is_memory_failure

        for line in iter(self.source.readline, b""):
            self.target.write(line)
            self.target.flush()
            if not self.memory_failure and is_memory_failure(line.decode(errors="replace")):
                self.memory_failure = True


def _memory_advice(args: list[str]) -> str:
    from vllm_kunlun.plan.advice import advice_for_serve

    try:
        return advice_for_serve(args[1:])
    except Exception as error:  # advice must never hide the server's own error
        return f"vllm-kunlun plan could not plan this deployment: {error}\n"


def supervise(args: list[str]) -> int:
    """Run `vllm-kunlun <args>` in a child process; its exit status, or 1 if it stopped alone."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # its lines reach us as they are written
    child = subprocess.Popen([sys.executable, "-m", "vllm_kunlun.cli", CHILD_FLAG, *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)  # fmt: skip
    streams = [_PassThrough(child.stdout, sys.stdout.buffer),
               _PassThrough(child.stderr, sys.stderr.buffer)]  # fmt: skip
    for stream in streams:
        stream.start()
    asked_to_stop = False

    def forward(signum: int, _frame) -> None:
        nonlocal asked_to_stop
        asked_to_stop = True
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = child.wait()
        for stream in streams:
            # Bounded: a process the child left behind could hold the pipe open.
            stream.join(timeout=10)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not asked_to_stop and any(stream.memory_failure for stream in streams):
        sys.stderr.write(_memory_advice(args))
    if status == 0 and not asked_to_stop:
        sys.stderr.write(STOPPED_ON_ITS_OWN)
        return 1
    return status
