"""EmulatedKunlunPlatform: how vLLM sees an emulated Kunlun XPU that computes on the host CPU.

The emulated XPU computes on the host, so the platform builds on vLLM's CpuPlatform: vLLM's
host-side handling (thread binding, gloo, spawn, no pinned memory, no graph capture) is right
for it, and the Kunlun parts (kernels, attention backend, worker, memory, name) come from
KunlunPlatformBase. The vLLM CPU branches it meets are listed in docs/architecture.md (design
choices).
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vllm.platforms.cpu import CpuPlatform

from vllm_kunlun.device import EmulatedRuntime
from vllm_kunlun.platform.base import KunlunPlatformBase

if TYPE_CHECKING:
    from vllm.config import VllmConfig


@dataclass(frozen=True)
class _MLAChoices:
    """The user's choices CpuPlatform overrides for MLA models, for its own CPU MLA kernels:
    block size 16, no chunked prefill, no prefix caching. The plugin's MLA backend has none of
    those limits, so the emulated platform puts the choices back."""

    block_size: int
    chunked_prefill: bool | None
    prefix_caching: bool | None
    max_num_batched_tokens: int | None

    @classmethod
    def of(cls, vllm_config: "VllmConfig") -> "_MLAChoices":
        cache, scheduler = vllm_config.cache_config, vllm_config.scheduler_config
        return cls(cache.block_size, scheduler.enable_chunked_prefill,
                   cache.enable_prefix_caching, scheduler.max_num_batched_tokens)  # fmt: skip

    def restore(self, vllm_config: "VllmConfig") -> None:
        model_config = vllm_config.model_config
        if model_config is None or not model_config.use_mla:
            return
        cache, scheduler = vllm_config.cache_config, vllm_config.scheduler_config
        cache.block_size = self.block_size
        cache.enable_prefix_caching = self.prefix_caching
        scheduler.enable_chunked_prefill = self.chunked_prefill
        scheduler.max_num_batched_tokens = self.max_num_batched_tokens


class EmulatedKunlunPlatform(KunlunPlatformBase, CpuPlatform):
    # vLLM uses device_name as the torch.distributed device string on OOT platforms.
    device_name: str = EmulatedRuntime.torch_device_type
    device_type: str = EmulatedRuntime.torch_device_type
    dispatch_key: str = "CPU"
    dist_backend: str = EmulatedRuntime.dist_backend

    def is_cpu(self) -> bool:
        """True: vLLM's host-device branches (memory nodes, OMP, gloo) apply to the emulated
        device. The plugin's layers and backend keep the compute (docs/architecture.md)."""
        return True

    @classmethod
    def check_and_update_config(cls, vllm_config: "VllmConfig") -> None:
        parallel_config = vllm_config.parallel_config
        chosen_executor = parallel_config.distributed_executor_backend
        mla_choices = _MLAChoices.of(vllm_config)
        super().check_and_update_config(vllm_config)
        mla_choices.restore(vllm_config)
        if chosen_executor == "uni":
            # CpuPlatform moves a one-worker engine to the multiprocessing executor so that it
            # can bind OpenMP threads in a fresh worker process. A Kunlun XPU runs one worker
            # in the engine process (vLLM's default), and so does the emulated one: the same
            # process layout, and one interpreter fewer to start.
            parallel_config.distributed_executor_backend = "uni"
        cls._check_kunlun_config(vllm_config)
        if parallel_config.distributed_executor_backend == "mp":
            from vllm_kunlun.worker.host_cores import share_host_cores

            share_host_cores(parallel_config.local_world_size)
