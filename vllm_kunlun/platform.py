"""KunlunPlatform: how vLLM sees a Kunlun XPU.

The class-level facts come from the device runtime (vllm_kunlun.device). On the emulated device
the XPU computes on the host, so the platform builds on vLLM's CpuPlatform: vLLM's host-side
handling (thread binding, gloo, spawn, no pinned memory, no graph capture) is right for it, and
the Kunlun parts (kernels, attention backend, worker, memory, name) are overridden here.
Overrides of vLLM CPU branches are listed in docs/architecture.md (design choices).
"""

from typing import TYPE_CHECKING

import torch
from vllm.platforms.cpu import CpuPlatform
from vllm.platforms.interface import DeviceCapability, PlatformEnum

from vllm_kunlun import envs
from vllm_kunlun.attention import BACKEND_PATH
from vllm_kunlun.device import current_runtime
from vllm_kunlun.log import get_logger

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig

logger = get_logger("platform")
_runtime = current_runtime()

#: vLLM layer classes the plugin replaces (vllm_kunlun.layers registers them).
OOT_LAYER_NAMES = ("RMSNorm", "GemmaRMSNorm", "RotaryEmbedding", "SiluAndMul", "GeluAndMul")

#: Block sizes the Kunlun kernels read (KUNLUN.md §3.4 uses 16, 64 and 128).
DEFAULT_BLOCK_SIZE = 64


class KunlunPlatform(CpuPlatform):
    _enum = PlatformEnum.OOT
    # vLLM uses device_name as the torch.distributed device string on OOT platforms.
    device_name: str = _runtime.torch_device_type
    device_type: str = _runtime.torch_device_type
    dispatch_key: str = "CPU" if _runtime.is_host else "CUDA"
    dist_backend: str = _runtime.dist_backend
    # Ray knows no Kunlun accelerator, and vLLM's Ray workers look their devices up under this
    # key among Ray's accelerator types: Kunlun hosts, real or emulated, advertise their XPUs as
    # Ray GPUs (`ray start --num-gpus N`). docs/distributed.md explains the set-up.
    ray_device_key: str = "GPU"
    # Workers pick their XPU by local rank, as with the multiprocessing executor: Ray must not
    # narrow the devices a worker sees.
    ray_noset_device_env_vars: list[str] = ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]
    # Copied from the engine to Ray workers (vLLM copies the VLLM_* variables itself).
    additional_env_vars: list[str] = ["XPU_VISIBLE_DEVICES"]
    supported_quantization: list[str] = []

    def is_cpu(self) -> bool:
        # vLLM's host-device branches (memory nodes, OMP, gloo) apply to the emulated device.
        return _runtime.is_host

    @property
    def supported_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def check_if_supports_dtype(cls, dtype: torch.dtype) -> None:
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(
                f"Kunlun XPUs run models in bfloat16, float16 or float32, not {dtype}. "
                "Pass --dtype bfloat16 (or float16/float32)."
            )

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        return _runtime.name

    @classmethod
    def get_device_capability(cls, device_id: int = 0) -> DeviceCapability | None:
        return None

    @classmethod
    def device_count(cls) -> int:
        return len(envs.visible_device_indices(_runtime.physical_device_count()))

    @classmethod
    def get_device_total_memory(cls, device_id: int = 0) -> int:
        return _runtime.total_memory(device_id)

    @classmethod
    def get_device_free_memory(cls, device_id: int = 0) -> int:
        return _runtime.free_memory(device_id)

    @classmethod
    def get_attn_backend_cls(
        cls,
        selected_backend: "AttentionBackendEnum",
        attn_selector_config: "AttentionSelectorConfig",
        num_heads: int | None = None,
    ) -> str:
        if attn_selector_config.use_mla or attn_selector_config.use_sparse:
            raise NotImplementedError(
                "vllm-kunlun does not support MLA or sparse attention models yet; "
                "see docs/support-matrix.md."
            )
        if selected_backend is not None and selected_backend.name != "CUSTOM":
            logger.warning(
                "Attention backend %s is not available on Kunlun; using the Kunlun backend.",
                selected_backend.name,
            )
        return BACKEND_PATH

    @classmethod
    def get_device_communicator_cls(cls) -> str:
        return _runtime.communicator_cls

    @classmethod
    def verify_quantization(cls, quant: str) -> None:
        raise ValueError(
            f"vllm-kunlun does not support quantization yet (--quantization {quant}, or the "
            "checkpoint's quantization_config). Drop --quantization and serve an unquantized "
            "checkpoint in bfloat16 or float16 instead."
        )

    @classmethod
    def validate_environ(cls, hard_fail: bool) -> None:
        """vLLM's check for unknown VLLM_* variables, knowing the plugin's own."""
        import os

        from vllm import envs as vllm_envs

        ours = {var.name for var in envs.ALL}
        for name in os.environ:
            if name.startswith("VLLM_") and name not in vllm_envs.environment_variables:
                if name in ours:
                    continue
                if hard_fail:
                    raise ValueError(f"Unknown vLLM environment variable detected: {name}")
                logger.warning("Unknown vLLM environment variable detected: %s", name)

    @classmethod
    def check_and_update_config(cls, vllm_config: "VllmConfig") -> None:
        cache_config = vllm_config.cache_config
        user_block_size = cache_config.user_specified_block_size
        super().check_and_update_config(vllm_config)
        if not user_block_size:
            cache_config.block_size = DEFAULT_BLOCK_SIZE
        elif cache_config.block_size % 16:
            raise ValueError(
                f"--block-size {cache_config.block_size} is not supported on Kunlun; "
                "use a multiple of 16 (16, 32, 64 or 128)."
            )
        if cache_config.cache_dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(
                f"--kv-cache-dtype {cache_config.cache_dtype} is not supported by vllm-kunlun "
                "yet; use --kv-cache-dtype auto."
            )
        parallel_config = vllm_config.parallel_config
        if parallel_config.worker_cls in ("auto", "vllm.v1.worker.cpu_worker.CPUWorker"):
            parallel_config.worker_cls = _runtime.worker_cls
        cls._check_devices_for_workers(parallel_config)
        if _runtime.is_host and parallel_config.distributed_executor_backend == "mp":
            from vllm_kunlun.worker.host_cores import share_host_cores

            share_host_cores(parallel_config.local_world_size)
        cls._route_layers_to_plugin_ops(vllm_config)

    @classmethod
    def _check_devices_for_workers(cls, parallel_config) -> None:
        """Refuse at start-up more workers on this host than it has visible Kunlun devices.

        Only for executors whose workers all run on this host; with Ray, the placement group
        checks the devices of the whole cluster.
        """
        if parallel_config.distributed_executor_backend not in ("mp", "uni"):
            return
        needed = parallel_config.local_world_size
        visible = cls.device_count()
        if needed <= visible:
            return
        selection = envs.XPU_VISIBLE_DEVICES.get().strip()
        shown = f" (XPU_VISIBLE_DEVICES={selection})" if selection else ""
        raise ValueError(
            f"--tensor-parallel-size {parallel_config.tensor_parallel_size} x "
            f"--pipeline-parallel-size {parallel_config.pipeline_parallel_size} needs {needed} "
            f"Kunlun XPUs on this host, one per worker, but only {visible} "
            f"{'is' if visible == 1 else 'are'} visible{shown}. "
            f"{_runtime.how_to_see_more_devices(needed)}; or lower --tensor-parallel-size."
        )

    @classmethod
    def _route_layers_to_plugin_ops(cls, vllm_config: "VllmConfig") -> None:
        """Keep the plugin's layer ops enabled under every compile mode.

        With the inductor backend vLLM disables custom ops by default, so layers would run
        their torch-native forward instead of the plugin's kernels.
        """
        custom_ops = vllm_config.compilation_config.custom_ops
        for name in OOT_LAYER_NAMES:
            if f"-{name}" not in custom_ops and f"+{name}" not in custom_ops:
                custom_ops.append(f"+{name}")
