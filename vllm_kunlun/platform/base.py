"""What the emulated and the real Kunlun platform share, written once.

`KunlunPlatformBase` answers from the device runtime (vllm_kunlun.device): device name, count
and memory, the communicator and the worker. It also holds the Kunlun choices that do not depend
on the device: dtypes, the plugin's attention backend, quantization checks, KV-cache block size
and dtype checks, and routing vLLM's layers to the plugin's ops. The two platform classes
(emulated.py, xpu.py) add only what differs between an emulated XPU and a real one.
"""

from typing import TYPE_CHECKING

import torch
from vllm.platforms.interface import DeviceCapability, Platform, PlatformEnum

from vllm_kunlun import envs
from vllm_kunlun.attention import BACKEND_PATH, MLA_BACKEND_PATH
from vllm_kunlun.device import DeviceRuntime, current_runtime
from vllm_kunlun.log import get_logger
from vllm_kunlun.quantization.checkpoint_config import (
    SUPPORTED_METHODS,
    check_method,
    check_quantization,
)

if TYPE_CHECKING:
    from vllm.config import ParallelConfig, VllmConfig
    from vllm.v1.attention.backends.mla.prefill.base import MLAPrefillBackend
    from vllm.v1.attention.backends.mla.prefill.selector import MLAPrefillSelectorConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig

logger = get_logger("platform")

#: Block size when the user does not choose one; Kunlun kernels read 16, 64 and 128 (KUNLUN.md
#: §3.4), and any multiple of 16 is accepted.
DEFAULT_BLOCK_SIZE = 64

#: Dtypes Kunlun XPUs run models in (KUNLUN.md §1.4 also lists int8, for quantized kernels).
MODEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

#: KV-cache dtypes the plugin's attention backend stores.
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32")

#: Worker classes the plugin replaces with the runtime's: vLLM's default, and the CPU worker
#: that CpuPlatform has already chosen by the time the emulated platform's checks run.
DEFAULT_WORKER_CLASSES = ("auto", "vllm.v1.worker.cpu_worker.CPUWorker")


class KunlunPlatformBase(Platform):
    _enum = PlatformEnum.OOT
    # Ray knows no Kunlun accelerator, and vLLM's Ray workers look their devices up under this
    # key among Ray's accelerator types: Kunlun hosts, real or emulated, advertise their XPUs as
    # Ray GPUs (`ray start --num-gpus N`). docs/distributed.md explains the set-up.
    ray_device_key: str = "GPU"
    # Workers pick their XPU by local rank, as with the multiprocessing executor: Ray must not
    # narrow the devices a worker sees.
    ray_noset_device_env_vars: list[str] = ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]
    # Copied from the engine to Ray workers (vLLM copies the VLLM_* variables itself).
    additional_env_vars: list[str] = [envs.XPU_VISIBLE_DEVICES.name]
    # vllm_kunlun.quantization checks the schemes inside these methods' checkpoints.
    supported_quantization: list[str] = list(SUPPORTED_METHODS)

    @classmethod
    def device_runtime(cls) -> DeviceRuntime:
        """The device runtime of this process (detected once, vllm_kunlun.device)."""
        return current_runtime()

    # Device facts ----------------------------------------------------------------------------

    @property
    def supported_dtypes(self) -> list[torch.dtype]:
        return list(MODEL_DTYPES)

    @classmethod
    def check_if_supports_dtype(cls, dtype: torch.dtype) -> None:
        if dtype not in MODEL_DTYPES:
            raise ValueError(
                f"Kunlun XPUs run models in bfloat16, float16 or float32, not {dtype}. "
                "Pass --dtype bfloat16 (or float16/float32)."
            )

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        return cls.device_runtime().name

    @classmethod
    def get_device_capability(cls, device_id: int = 0) -> DeviceCapability | None:
        """None: vLLM reads capabilities as NVIDIA compute capabilities to pick CUDA kernels,
        and no Kunlun value is recorded (KUNLUN.md §1.4), so no capability check passes."""
        return None

    @classmethod
    def device_count(cls) -> int:
        return len(envs.visible_device_indices(cls.device_runtime().physical_device_count()))

    @classmethod
    def get_device_total_memory(cls, device_id: int = 0) -> int:
        return cls.device_runtime().total_memory(device_id)

    @classmethod
    def get_device_free_memory(cls, device_id: int = 0) -> int:
        return cls.device_runtime().free_memory(device_id)

    # What runs on the device -----------------------------------------------------------------

    @classmethod
    def get_attn_backend_cls(
        cls,
        selected_backend: "AttentionBackendEnum",
        attn_selector_config: "AttentionSelectorConfig",
        num_heads: int | None = None,
    ) -> str:
        if attn_selector_config.use_sparse:
            raise NotImplementedError(
                "vllm-kunlun does not support sparse attention (DeepSeek-V3.2's top-k indexer) "
                "yet; serve a dense MLA model (DeepSeek-V2/V3/R1) instead. See "
                "docs/support-matrix.md."
            )
        if attn_selector_config.use_mla:
            return MLA_BACKEND_PATH
        if selected_backend is not None and selected_backend.name != "CUSTOM":
            logger.warning(
                "Attention backend %s is not available on Kunlun; using the Kunlun backend.",
                selected_backend.name,
            )
        return BACKEND_PATH

    @classmethod
    def get_mla_prefill_backend_cls(
        cls, mla_selector_config: "MLAPrefillSelectorConfig"
    ) -> "type[MLAPrefillBackend]":
        from vllm_kunlun.attention.mla_prefill import KunlunMLAPrefillBackend

        return KunlunMLAPrefillBackend

    @classmethod
    def get_device_communicator_cls(cls) -> str:
        return cls.device_runtime().communicator_cls

    @classmethod
    def support_hybrid_kv_cache(cls) -> bool:
        """True: the plugin's backend reads each KV-cache group's tensors the same way on both
        devices, so models mixing sliding-window and full attention keep vLLM's hybrid manager."""
        return True

    @classmethod
    def check_runner_kv_caches_multi_layer(cls) -> None:
        """Both vLLM model runners the plugin uses (CPU and GPU) key KV caches by layer name."""

    @classmethod
    def verify_quantization(cls, quant: str) -> None:
        """The method name only; the checkpoint's scheme is checked in check_and_update_config."""
        check_method(quant)

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

    # Config checks both platforms make ----------------------------------------------------

    @classmethod
    def update_block_size_for_backend(cls, vllm_config: "VllmConfig") -> None:
        """Keep the block size check_and_update_config chose; align it only for hybrid models.

        vLLM's default would replace an unset block size with the backend's preferred one (16),
        undoing the Kunlun default. Hybrid (attention + mamba) models still need their
        attention and state pages aligned, as vLLM does for every platform.
        """
        model_config = vllm_config.model_config
        if model_config is None or not model_config.is_hybrid:
            return
        backends = cls._find_non_ssm_backends(vllm_config)
        if not backends:
            return
        before = vllm_config.cache_config.block_size
        cls._align_hybrid_block_size(vllm_config, backends[0])
        cls._check_aligned_block_size(vllm_config, backends, before)

    @classmethod
    def _check_kunlun_config(cls, vllm_config: "VllmConfig") -> None:
        """The checks and choices of check_and_update_config that both devices make."""
        cls._choose_block_size(vllm_config)
        cls._check_kv_cache_dtype(vllm_config)
        cls._check_quantization(vllm_config)
        parallel_config = vllm_config.parallel_config
        if parallel_config.worker_cls in DEFAULT_WORKER_CLASSES:
            parallel_config.worker_cls = cls.device_runtime().worker_cls
        cls._check_devices_for_workers(parallel_config)
        cls._check_context_parallel(parallel_config)
        cls._route_layers_to_plugin_ops(vllm_config)

    @classmethod
    def _choose_block_size(cls, vllm_config: "VllmConfig") -> None:
        cache_config = vllm_config.cache_config
        if not cache_config.user_specified_block_size:
            cache_config.block_size = DEFAULT_BLOCK_SIZE
        elif cache_config.block_size % 16:
            raise ValueError(
                f"--block-size {cache_config.block_size} is not supported on Kunlun; "
                "use a multiple of 16 (16, 32, 64 or 128)."
            )

    @classmethod
    def _check_kv_cache_dtype(cls, vllm_config: "VllmConfig") -> None:
        cache_dtype = vllm_config.cache_config.cache_dtype
        if cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"--kv-cache-dtype {cache_dtype} is not supported by vllm-kunlun yet; "
                "use --kv-cache-dtype auto."
            )

    @classmethod
    def _check_quantization(cls, vllm_config: "VllmConfig") -> None:
        model_config = vllm_config.model_config
        if model_config is None:
            return
        hf_config = model_config.hf_config
        arch_config = getattr(model_config, "model_arch_config", None)
        quant_config = getattr(arch_config, "quantization_config", None)
        if quant_config is None:
            quant_config = getattr(hf_config, "quantization_config", None)
        check_quantization(model_config.quantization, quant_config, hf_config, model_config.model,
                           vllm_config.parallel_config.tensor_parallel_size)  # fmt: skip

    @classmethod
    def _check_devices_for_workers(cls, parallel_config: "ParallelConfig") -> None:
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
        how_to = cls.device_runtime().how_to_see_more_devices(needed)
        raise ValueError(
            f"--tensor-parallel-size {parallel_config.tensor_parallel_size} x "
            f"--pipeline-parallel-size {parallel_config.pipeline_parallel_size} needs {needed} "
            f"Kunlun XPUs on this host, one per worker, but only {visible} "
            f"{'is' if visible == 1 else 'are'} visible{shown}. "
            f"{how_to}; or lower --tensor-parallel-size."
        )

    @classmethod
    def _check_context_parallel(cls, parallel_config: "ParallelConfig") -> None:
        for flag, size in (
            ("--decode-context-parallel-size", parallel_config.decode_context_parallel_size),
            ("--prefill-context-parallel-size", parallel_config.prefill_context_parallel_size),
        ):
            if size > 1:
                raise ValueError(
                    f"{flag} {size} is not supported by vllm-kunlun yet; leave it at 1 and "
                    "use --tensor-parallel-size to spread a model over more XPUs."
                )

    @classmethod
    def _route_layers_to_plugin_ops(cls, vllm_config: "VllmConfig") -> None:
        """Keep the plugin's layer ops enabled under every compile mode.

        With the inductor backend, or a user's `custom_ops: ["none"]`, vLLM disables custom ops,
        so layers would run their torch-native forward instead of the plugin's kernels.
        """
        from vllm_kunlun.layers import OOT_LAYERS

        custom_ops = vllm_config.compilation_config.custom_ops
        for name in OOT_LAYERS:
            if f"-{name}" not in custom_ops and f"+{name}" not in custom_ops:
                custom_ops.append(f"+{name}")
