"""Building the emulated device's C++ kernels (csrc/), once per machine, cached.

The emulated device's fast paths (the `compiled.py` of a family) call into one extension module
built from csrc/ with torch's extension builder (a C++ compiler and ninja). vLLM's CPU worker
runs every kernel on one thread (docs/benchmarks.md), where the reference kernels' extra passes
and temporaries cost the most; the C++ kernels make one pass over each row and read KV pages in
place. One build per (sources, torch, CPU type), under the plugin's cache directory.
"""

import functools
import hashlib
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from vllm_kunlun import envs
from vllm_kunlun.log import get_logger

logger = get_logger("ops")

CSRC = Path(__file__).parent / "csrc"
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math"]


def sources() -> list[Path]:
    return sorted(CSRC.glob("*.cpp"))


def headers() -> list[Path]:
    return sorted(CSRC.glob("*.h"))


def compiler_available() -> bool:
    return shutil.which("c++") is not None


def _cpu_flags() -> str:
    """The host's instruction-set flags: the build uses -march=native, so it is per CPU type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def build_directory() -> Path:
    """One build per (source, torch, CPU type), under the plugin's cache directory."""
    texts = [path.read_text() for path in (*sources(), *headers())]
    key = "\n".join([*texts, torch.__version__, sys.version, _cpu_flags(), *CFLAGS])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return envs.cache_dir() / "kernels" / f"emulated-{digest}"


@functools.cache
def load_kernels() -> ModuleType:
    """Build (first use on this machine only) and import the C++ kernels."""
    from torch.utils import cpp_extension

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    fresh = not any(directory.glob("*.so"))
    if fresh:
        logger.info("vllm-kunlun: compiling the emulated device's C++ kernels into %s "
                    "(first use on this machine; 20 to 40 s) ...", directory)  # fmt: skip
    started = time.monotonic()
    module = cpp_extension.load(
        name="vllm_kunlun_emulated_kernels",
        sources=[str(path) for path in sources()],
        extra_cflags=CFLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        verbose=False,
    )
    if fresh:
        logger.info("vllm-kunlun: C++ kernels built in %.0f s", time.monotonic() - started)
    return module


def on_host(*tensors: torch.Tensor) -> bool:
    """True when every tensor is on the host CPU (the C++ kernels' only device)."""
    return all(t.device.type == "cpu" for t in tensors)


def row_layout(*tensors: torch.Tensor) -> bool:
    """Host tensors of one dtype, each contiguous: what the row kernels take. float16 stays with
    the reference: its conversions do not vectorize in C++, and torch's kernels are faster."""
    first = tensors[0]
    return (
        first.device.type == "cpu"
        and first.dtype in (torch.float32, torch.bfloat16)
        and all(t.is_contiguous() and t.dtype == first.dtype and t.device == first.device
                for t in tensors)
    )  # fmt: skip
