"""The worker for the emulated XPU: vLLM's CPU worker and model runner, with device memory.

vLLM's CPU worker sizes the KV cache from the host's NUMA node and reads
--gpu-memory-utilization as a fraction of host RAM. The emulated XPU instead has its own memory
(VLLM_KUNLUN_EMULATED_MEMORY_GIB), and --gpu-memory-utilization is a fraction of that, as on a
real device: KV cache = total * utilization - weights - peak activations.

With several emulated XPUs (VLLM_KUNLUN_EMULATED_DEVICES), the worker of local rank r binds to
the r-th visible emulated XPU (XPU_VISIBLE_DEVICES) and accounts memory on that device only.
"""

import contextlib
import resource
from pathlib import Path

import psutil
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_worker import Worker

from vllm_kunlun import envs
from vllm_kunlun.device import EmulatedRuntime, current_runtime
from vllm_kunlun.log import get_logger
from vllm_kunlun.model_bytes import device_weight_bytes
from vllm_kunlun.worker import (
    OpStatsMixin,
    check_routes,
    data_parallel_device_offset,
    global_rank,
    on_worker_start,
)
from vllm_kunlun.worker.host_cores import use_the_cpu_backends_thread_count

logger = get_logger("worker")
GiB = 1 << 30


def _reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
    # Where unsupported, the peak covers the process lifetime: a safe over-estimate.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_bytes() -> int:
    return psutil.Process().memory_info().rss


class EmulatedKunlunWorker(OpStatsMixin, CPUWorker):
    def __init__(self, vllm_config, local_rank, rank, distributed_init_method,
                 is_driver_worker: bool = False) -> None:  # fmt: skip
        runtime = current_runtime()
        assert isinstance(runtime, EmulatedRuntime)
        self.runtime = runtime
        # Skip CPUWorker.__init__: its start-up check compares --gpu-memory-utilization with
        # host RAM. The emulated device's own budget is checked in determine_available_memory.
        Worker.__init__(self, vllm_config, local_rank, rank, distributed_init_method,
                        is_driver_worker=is_driver_worker)  # fmt: skip
        self.parallel_config.disable_custom_all_reduce = True
        if self.parallel_config.distributed_executor_backend == "uni":
            use_the_cpu_backends_thread_count()
        self.device_index = self._bind_device()
        on_worker_start(rank=global_rank(self.parallel_config, self.rank))

    def _bind_device(self) -> int:
        """The emulated XPU of this worker: the local_rank-th visible one, counted after the
        XPUs of the data-parallel engines before it on this host (as vLLM's GPU worker does)."""
        visible = envs.visible_device_indices(self.runtime.physical_device_count())
        offset = data_parallel_device_offset(self.parallel_config)
        position = self.local_rank + offset
        if position >= len(visible):
            after = f", after the {offset} XPUs of earlier data-parallel engines" if offset else ""
            raise ValueError(
                f"Worker {self.rank} (local rank {self.local_rank}{after}) has no emulated XPU: "
                f"{len(visible)} visible ({visible}). Raise VLLM_KUNLUN_EMULATED_DEVICES or "
                "widen XPU_VISIBLE_DEVICES."
            )
        index = visible[position]
        self.runtime.set_device(index)
        logger.info("Worker %d runs on emulated XPU %d.", self.rank, index)
        return index

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        # What a Kunlun XPU would hold: the model's tensors, with the linear weights vLLM's CPU
        # GEMM repacked into host-only buffers counted at their own size (model_bytes).
        self.weights_bytes = device_weight_bytes(self.model_runner.get_model())
        self.runtime.record_allocation(self.device_index, self.weights_bytes)
        check_routes(self.model_runner.get_model(), global_rank(self.parallel_config, self.rank))

    def determine_available_memory(self) -> int:
        explicit = self.cache_config.kv_cache_memory_bytes
        device_index = self.device_index
        total = self.runtime.total_memory(device_index)
        weights = self.weights_bytes

        # Peak activations of the largest batch, as the GPU worker measures them.
        rss_before = _rss_bytes()
        _reset_peak_rss()
        if self._should_warm_up_model():
            self.model_runner.warming_up_model()
        else:
            self.model_runner.profile_run()
        activations = max(0, _peak_rss_bytes() - rss_before)
        self.activation_bytes = activations

        if explicit is not None:
            kv_bytes = explicit
            source = "explicitly requested"
        else:
            utilization = self.cache_config.gpu_memory_utilization
            kv_bytes = int(total * utilization) - weights - activations
            source = f"{utilization:.2f} x {total / GiB:.2f} GiB - weights - activations"
        if kv_bytes <= 0 or kv_bytes > self.runtime.free_memory(device_index):
            raise ValueError(
                f"The emulated XPU has {total / GiB:.2f} GiB; weights take {weights / GiB:.2f} "
                f"GiB and activations {activations / GiB:.2f} GiB, leaving no room for a KV "
                f"cache of {kv_bytes / GiB:.2f} GiB ({source}). Raise "
                "VLLM_KUNLUN_EMULATED_MEMORY_GIB or --gpu-memory-utilization, or lower "
                "--max-num-batched-tokens."
            )
        logger.info(
            "Emulated XPU %d: %.2f GiB total, %.2f GiB weights, %.2f GiB activations, "
            "%.2f GiB KV cache (%s).",
            device_index, total / GiB, weights / GiB, activations / GiB, kv_bytes / GiB, source,
        )  # fmt: skip
        return kv_bytes

    def initialize_from_config(self, kv_cache_config) -> None:
        super().initialize_from_config(kv_cache_config)
        self.kv_cache_bytes = sum(t.size for t in kv_cache_config.kv_cache_tensors)
        self.runtime.record_allocation(self.device_index, self.kv_cache_bytes)

    def kunlun_memory_report(self) -> dict[str, int]:
        """What this worker's emulated XPU holds, in bytes (for `collective_rpc`)."""
        return {
            "device": self.device_index,
            "total": self.runtime.total_memory(self.device_index),
            "weights": self.weights_bytes,
            "activations": getattr(self, "activation_bytes", 0),
            "kv_cache": getattr(self, "kv_cache_bytes", 0),
            "in_use": self.runtime.total_memory(self.device_index)
            - self.runtime.free_memory(self.device_index),
        }
