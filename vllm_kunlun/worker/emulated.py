"""The worker for the emulated XPU: vLLM's CPU worker and model runner, with device memory.

vLLM's CPU worker sizes the KV cache from the host's NUMA node and reads
--gpu-memory-utilization as a fraction of host RAM. The emulated XPU instead has its own memory
(VLLM_KUNLUN_EMULATED_MEMORY_GIB), and --gpu-memory-utilization is a fraction of that, as on a
real device: KV cache = total * utilization - weights - peak activations.
"""

import resource

from vllm.logger import init_logger
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_worker import Worker

from vllm_kunlun.device import EmulatedRuntime, current_runtime
from vllm_kunlun.ops import stats

logger = init_logger(__name__)
GiB = 1 << 30


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class EmulatedKunlunWorker(CPUWorker):
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
        stats.install_exit_hook()

    def determine_available_memory(self) -> int:
        explicit = self.cache_config.kv_cache_memory_bytes
        device_index = self.local_rank
        total = self.runtime.total_memory(device_index)
        weights = sum(
            t.numel() * t.element_size()
            for t in list(self.model_runner.model.parameters())
            + list(self.model_runner.model.buffers())
        )
        self.runtime.record_allocation(device_index, weights)

        rss_before = _peak_rss_bytes()
        if self._should_warm_up_model():
            self.model_runner.warming_up_model()
        activations = max(0, _peak_rss_bytes() - rss_before)

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
        kv_bytes = sum(t.size for t in kv_cache_config.kv_cache_tensors)
        self.runtime.record_allocation(self.local_rank, kv_bytes)

    def get_device_memory_in_use(self) -> int:
        return self.runtime.total_memory(self.local_rank) - self.runtime.free_memory(
            self.local_rank
        )
