"""Every environment variable vllm-kunlun reads, with its default and meaning.

All reads go through this module so the documentation (docs/configuration.md) can be checked
against one list.
"""

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    help: str

    def get(self) -> str:
        return os.environ.get(self.name, self.default)


VLLM_KUNLUN_EMULATE = EnvVar(
    "VLLM_KUNLUN_EMULATE",
    "0",
    "1 runs the plugin on an emulated Kunlun XPU on the host CPU when no XPU runtime is found.",
)
VLLM_KUNLUN_EMULATED_MEMORY_GIB = EnvVar(
    "VLLM_KUNLUN_EMULATED_MEMORY_GIB",
    "4",
    "Memory of each emulated XPU in GiB (weights, activations and KV cache together; "
    "--gpu-memory-utilization is a fraction of it).",
)
VLLM_KUNLUN_EMULATED_DEVICES = EnvVar(
    "VLLM_KUNLUN_EMULATED_DEVICES",
    "1",
    "Number of emulated XPUs on this host (each with its own VLLM_KUNLUN_EMULATED_MEMORY_GIB); "
    "set it to at least --tensor-parallel-size x --pipeline-parallel-size.",
)
VLLM_KUNLUN_KERNELS = EnvVar(
    "VLLM_KUNLUN_KERNELS",
    "auto",
    "Kernel provider: 'auto' (the Kunlun library when kunlun_ops imports; else the compiled "
    "provider when a C++ compiler is found; else the reference kernels), 'reference' (plain "
    "PyTorch only), 'compiled' (decode attention, rotary, norms and KV writes compiled "
    "from C++ for the emulated device; fail without a C++ compiler) or 'kunlun' (fail if "
    "kunlun_ops does not import).",
)
VLLM_KUNLUN_OP_STATS = EnvVar(
    "VLLM_KUNLUN_OP_STATS",
    "",
    "Directory; every process that ran plugin ops writes ops-<pid>.json (op name -> calls) "
    "there at exit; a worker writes ops-rank<r>-<pid>.json.",
)
VLLM_KUNLUN_ROUTE_REPORT = EnvVar(
    "VLLM_KUNLUN_ROUTE_REPORT",
    "",
    "Directory; every worker writes the route report of its model there at start-up as "
    "routes-rank<r>-<pid>.json (layer type -> plugin op / vLLM native / refused).",
)
VLLM_KUNLUN_CACHE_DIR = EnvVar(
    "VLLM_KUNLUN_CACHE_DIR",
    "",
    "Where the prepared default model and the emulated device's compiled kernels are kept. "
    "Default: $XDG_CACHE_HOME/vllm-kunlun (~/.cache/vllm-kunlun).",
)
XPU_VISIBLE_DEVICES = EnvVar(
    "XPU_VISIBLE_DEVICES",
    "",
    "Comma-separated XPU indices this process may use (like CUDA_VISIBLE_DEVICES).",
)

ALL: tuple[EnvVar, ...] = (
    VLLM_KUNLUN_EMULATE,
    VLLM_KUNLUN_EMULATED_MEMORY_GIB,
    VLLM_KUNLUN_EMULATED_DEVICES,
    VLLM_KUNLUN_KERNELS,
    VLLM_KUNLUN_OP_STATS,
    VLLM_KUNLUN_ROUTE_REPORT,
    VLLM_KUNLUN_CACHE_DIR,
    XPU_VISIBLE_DEVICES,
)


def cache_dir() -> Path:
    """VLLM_KUNLUN_CACHE_DIR, or $XDG_CACHE_HOME/vllm-kunlun, or ~/.cache/vllm-kunlun."""
    configured = VLLM_KUNLUN_CACHE_DIR.get()
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vllm-kunlun"


def emulation_requested() -> bool:
    return VLLM_KUNLUN_EMULATE.get().strip().lower() in ("1", "true", "yes", "on")


def visible_device_indices(available: int) -> list[int]:
    """Device indices selected by XPU_VISIBLE_DEVICES, validated against `available`."""
    raw = XPU_VISIBLE_DEVICES.get().strip()
    if not raw:
        return list(range(available))
    try:
        indices = [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise ValueError(
            f"XPU_VISIBLE_DEVICES={raw!r} is not a comma-separated list of device indices "
            "(for example '0,1')."
        ) from None
    bad = [i for i in indices if not 0 <= i < available]
    if bad:
        raise ValueError(
            f"XPU_VISIBLE_DEVICES={raw!r} names device(s) {bad}, but only {available} "
            f"device(s) exist (indices 0..{available - 1})."
        )
    return indices


def _set(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextlib.contextmanager
def overridden(values: dict[str, str | None]) -> Iterator[None]:
    """Set (or, with None, unset) environment variables for the duration; restore them after."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        _set(values)
        yield
    finally:
        _set(saved)
