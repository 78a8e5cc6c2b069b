"""`vllm-kunlun serve` as a supervisor: a server that stops on its own exits non-zero.

vLLM's API server shuts down cleanly (status 0) when its engine or a worker dies, so process
managers (systemd, Kubernetes, a shell script) cannot tell a crash from a requested stop. The
supervisor runs the server in a child process, forwards SIGINT/SIGTERM to it, and when the child
ends without having been asked to, reports the failure and exits with status 1.
"""

import signal
import subprocess
import sys

#: Argument that marks the supervised child; `vllm-kunlun` removes it before running vLLM.
CHILD_FLAG = "--kunlun-supervised"
STOPPED_ON_ITS_OWN = (
    "vllm-kunlun: the server stopped without being asked to (its engine or a worker process "
    "died; see the log above). Exiting with status 1.\n"
)


def supervise(args: list[str]) -> int:
    """Run `vllm-kunlun <args>` in a child process; its exit status, or 1 if it stopped alone."""
    child = subprocess.Popen([sys.executable, "-m", "vllm_kunlun.cli", CHILD_FLAG, *args])
    asked_to_stop = False

    def forward(signum: int, _frame) -> None:
        nonlocal asked_to_stop
        asked_to_stop = True
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if status == 0 and not asked_to_stop:
        sys.stderr.write(STOPPED_ON_ITS_OWN)
        return 1
    return status
