"""The compiled provider: the emulated device's decode attention, rotary, norms and KV-cache
writes compiled from C++ for the host CPU; the other ops stay the reference kernels (prefill and
encoder attention are torch's fused attention, the activations one torch call each).

vLLM's CPU worker runs every kernel on one thread (docs/benchmarks.md), where the reference
kernels' extra passes and temporaries cost the most: the reference decode attention gathers every
request's KV pages into dense copies before attending, and the norms and rotary make
several torch calls with a temporary each. The C++ kernels in csrc/ read the pages in place and
make one pass over each row. Layouts they do not take (non-contiguous rows, mixed dtypes,
tensors on a real device) go to the reference kernels. The kernels are built once per machine
with torch's extension builder (a C++ compiler and ninja; vLLM's CPU build already needs both)
and cached under the plugin's cache directory. The reference stays the specification: the
compiled kernels are tested against it and against the plain formulas
(tests/test_compiled_kernels.py).
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
from vllm_kunlun.ops.provider import ReferenceProvider

logger = get_logger("ops")

CSRC = Path(__file__).parent / "csrc"
SOURCES = [
    CSRC / name for name in ("decode_attention.cpp", "rotary_embedding.cpp", "elementwise.cpp")
]
HEADERS = [CSRC / "vector_math.h"]
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math"]


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
    sources = [path.read_text() for path in (*SOURCES, *HEADERS)]
    key = "\n".join([*sources, torch.__version__, sys.version, _cpu_flags(), *CFLAGS])
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
        sources=[str(path) for path in SOURCES],
        extra_cflags=CFLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        verbose=False,
    )
    if fresh:
        logger.info("vllm-kunlun: C++ kernels built in %.0f s", time.monotonic() - started)
    return module


class CompiledProvider(ReferenceProvider):
    name = "compiled"
    description = (
        "decode attention, rotary, norms and KV writes compiled from C++, other ops reference "
        "(emulated device)"
    )

    @staticmethod
    def prepare() -> None:
        """Build or load the kernels now, at worker start, rather than in the first step."""
        load_kernels()

    @staticmethod
    def decode_attention(
        out, query, key_cache, value_cache, block_table, seq_lens, seq_lens_cpu,
        max_seq_len, max_model_len, scale, sliding_window, softcap,
    ) -> None:  # fmt: skip
        if query.device.type != "cpu":  # host kernels; a real device's tensors take the reference
            ReferenceProvider.decode_attention(
                out, query, key_cache, value_cache, block_table, seq_lens, seq_lens_cpu,
                max_seq_len, max_model_len, scale, sliding_window, softcap,
            )  # fmt: skip
            return
        load_kernels().decode_attention(
            out, query, key_cache, value_cache, block_table.to(torch.int32),
            seq_lens.to(torch.int32).contiguous(), scale, sliding_window, softcap,
        )  # fmt: skip

    @staticmethod
    def rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox) -> None:
        if query.device.type != "cpu":
            ReferenceProvider.rotary_embedding(
                positions, query, key, head_size, cos_sin_cache, is_neox
            )
            return
        positions = positions.flatten().to(torch.int64).contiguous()
        num_tokens = positions.shape[0]
        cache = cos_sin_cache.contiguous()
        if cache.dtype not in (torch.float32, query.dtype):
            cache = cache.float()
        for x in (query, key):
            if x is not None:
                load_kernels().rotary_embedding(
                    x.view(num_tokens, -1, head_size), positions, cache, is_neox
                )

    @staticmethod
    def rms_norm(x, weight, eps):
        if not _compiled_layout(x, weight):
            return ReferenceProvider.rms_norm(x, weight, eps)
        return load_kernels().rms_norm(x, weight, eps)

    @staticmethod
    def fused_add_rms_norm(x, residual, weight, eps) -> None:
        if not _compiled_layout(x, residual, weight):
            ReferenceProvider.fused_add_rms_norm(x, residual, weight, eps)
            return
        load_kernels().fused_add_rms_norm(x, residual, weight, eps)

    @staticmethod
    def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping) -> None:
        if key.device.type != "cpu" or not (key.dtype == value.dtype == key_cache.dtype):
            ReferenceProvider.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
            return
        load_kernels().reshape_and_cache(
            key, value, key_cache, value_cache, slot_mapping.to(torch.int64).contiguous()
        )


def _compiled_layout(*tensors: torch.Tensor) -> bool:
    """Host tensors of one dtype, each contiguous: what the row kernels take. float16 stays with
    the reference: its conversions do not vectorize in C++, and torch's kernels are faster."""
    first = tensors[0]
    return (
        first.device.type == "cpu"
        and first.dtype in (torch.float32, torch.bfloat16)
        and all(t.is_contiguous() and t.dtype == first.dtype and t.device == first.device
                for t in tensors)
    )  # fmt: skip
