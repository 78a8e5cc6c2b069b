"""Op accounting: how often each plugin op ran in this process.

With VLLM_KUNLUN_OP_STATS=<dir>, a process that ran plugin ops writes <dir>/ops-<pid>.json
({"op name": calls}) when it exits; a worker names its rank too: ops-rank<r>-<pid>.json. Tests
read these files to prove which kernels did the work, and on which ranks. Collectives of the
Kunlun communicator count as "comm.<collective>".
"""

import atexit
import json
import os
from collections import Counter
from pathlib import Path

from vllm_kunlun import envs

_counts: Counter[str] = Counter()
_hook_installed = False
_rank: int | None = None


def record(op_name: str) -> None:
    _counts[op_name] += 1


def snapshot() -> dict[str, int]:
    return dict(_counts)


def set_rank(rank: int) -> None:
    """Name this process's stats file after its worker rank as well as its pid."""
    global _rank
    _rank = rank


def stats_file_name() -> str:
    prefix = "ops-" if _rank is None else f"ops-rank{_rank}-"
    return f"{prefix}{os.getpid()}.json"


def write_stats(directory: str | os.PathLike[str]) -> Path | None:
    """Write this process's counts to <directory>/<stats_file_name()>; None if no op ran."""
    if not _counts:
        return None
    path = Path(directory) / stats_file_name()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(sorted(_counts.items())), indent=1))
    tmp.replace(path)
    return path


def write_now() -> str | None:
    """Write this process's counts now, if VLLM_KUNLUN_OP_STATS is set; the path, or None.

    It runs at exit (install_exit_hook), and workers call it on
    `LLM.collective_rpc("write_op_stats")`: Ray kills its workers at shutdown, so their exit
    hook never runs."""
    directory = envs.VLLM_KUNLUN_OP_STATS.get()
    path = write_stats(directory) if directory else None
    return None if path is None else str(path)


def install_exit_hook() -> None:
    """Arrange for the counts to be written at exit when VLLM_KUNLUN_OP_STATS is set."""
    global _hook_installed
    if not _hook_installed and envs.VLLM_KUNLUN_OP_STATS.get():
        atexit.register(write_now)
        _hook_installed = True
