"""KunlunPlatform: how vLLM sees a real Kunlun XPU (P800) under xpytorch.

Needs a Kunlun XPU; verified only by tests/test_platform_xpu.py with a faked runtime.

Under xpytorch, XPUs are torch `cuda` devices and collectives use the "nccl" backend name,
served by BKCL (KUNLUN.md §1.4). The platform builds on vLLM's `Platform`, not on a CUDA or CPU
platform: vLLM must take neither its NVIDIA branches (`is_cuda()` is False) nor its host-CPU
ones. The facts and choices follow the public Kunlun plugin, except memory, which is the
device's own (never host RAM), and LoRA, which is refused until the plugin has a Kunlun punica
wrapper.
"""

from dataclasses import fields
from typing import TYPE_CHECKING

import torch

from vllm_kunlun import envs
from vllm_kunlun.device import XpuRuntime, current_runtime
from vllm_kunlun.log import get_logger
from vllm_kunlun.platform.base import KunlunPlatformBase

if TYPE_CHECKING:
    from vllm.config import CompilationConfig, VllmConfig

logger = get_logger("platform")

#: vLLM's attention ops, which Kunlun graphs must leave outside every captured piece: the
#: Kunlun kernels read host-side lengths at launch, which a graph would freeze (KUNLUN.md §3.2).
ATTENTION_SPLITTING_OPS = (
    "vllm::unified_attention_with_output",
    "vllm::unified_mla_attention_with_output",
)

#: The torch.compile backend on Kunlun: no Inductor and no Triton code generation (§1.6).
COMPILE_BACKEND = "eager"

LORA_REFUSAL = (
    "LoRA adapters are not supported on Kunlun XPUs yet (--enable-lora). Merge the adapter "
    "into the base model's weights (for example with PEFT's merge_and_unload()) and serve the "
    "merged checkpoint without --enable-lora."
)


class KunlunPlatform(KunlunPlatformBase):
    """A Kunlun XPU. Decisions on vLLM's platform hooks that are not obvious:

    - Graphs are piecewise only (`check_and_update_config`), captured by vLLM's
      `CUDAGraphWrapper`, which xpytorch maps to XPU graphs. vLLM 0.32 has no
      `get_piecewise_backend_cls` hook: its piecewise backend is device-neutral and wraps each
      piece with `get_static_graph_wrapper_cls()`.
    - Left at vLLM's defaults: pinned host memory (available), `torch.inference_mode`,
      custom all-reduce (off), async scheduling (vLLM decides), no device capability.
    - Not provided, so vLLM refuses the features that need them: stateless device process
      groups (`stateless_init_device_torch_dist_pg`), `num_compute_units`, the device UUID.
    """

    # vLLM uses device_name as the torch.distributed device string on OOT platforms.
    device_name: str = XpuRuntime.torch_device_type
    device_type: str = XpuRuntime.torch_device_type
    dispatch_key: str = "CUDA"
    dist_backend: str = XpuRuntime.dist_backend
    # vLLM narrows the visible devices per data-parallel engine through this variable, which
    # xpytorch honours like CUDA_VISIBLE_DEVICES.
    device_control_env_var: str = envs.XPU_VISIBLE_DEVICES.name
    # Also the backend of vLLM's standalone torch.compile calls.
    simple_compile_backend: str = COMPILE_BACKEND

    @classmethod
    def device_runtime(cls) -> XpuRuntime:
        runtime = current_runtime()
        if not isinstance(runtime, XpuRuntime):
            raise RuntimeError(
                f"KunlunPlatform needs the Kunlun XPU runtime, but this process detected "
                f"{type(runtime).__name__}; the emulated device uses EmulatedKunlunPlatform."
            )
        return runtime

    # Device runtime ------------------------------------------------------------------------

    @classmethod
    def set_device(cls, device: torch.device) -> None:
        cls.device_runtime().set_device(torch.device(device).index or 0)

    @classmethod
    def manual_seed_all(cls, seed: int) -> None:
        """torch.manual_seed seeds every device's generator, the `cuda` XPUs included."""
        torch.manual_seed(seed)

    @classmethod
    def get_current_memory_usage(cls, device: torch.types.Device | None = None) -> float:
        return cls.device_runtime().allocated_memory(device)

    @classmethod
    def import_kernels(cls) -> None:
        """Nothing: vLLM's compiled kernels are built for NVIDIA GPUs and cannot run on an XPU.
        The plugin's ops and layers are registered by `vllm_kunlun.register_ops`."""

    def is_sleep_mode_available(self) -> bool:
        """False: sleep mode needs vLLM's CUDA memory-pool allocator (KUNLUN.md §1.4, §3.4)."""
        return False

    def is_cumem_allocator_available(self) -> bool:
        return False

    @classmethod
    def use_custom_op_collectives(cls) -> bool:
        """True: collectives enter traced graphs as vLLM's opaque ops, as on CUDA."""
        return True

    @classmethod
    def get_punica_wrapper(cls) -> str:
        raise NotImplementedError(LORA_REFUSAL)

    # Graphs ----------------------------------------------------------------------------------

    @classmethod
    def support_static_graph_mode(cls) -> bool:
        return True

    @classmethod
    def get_static_graph_wrapper_cls(cls) -> str:
        return "vllm.compilation.cuda_graph.CUDAGraphWrapper"

    @classmethod
    def opaque_attention_op(cls) -> bool:
        """True: attention is one custom op, so graphs can be split around it."""
        return True

    # Config ----------------------------------------------------------------------------------

    @classmethod
    def apply_config_platform_defaults(cls, vllm_config: "VllmConfig") -> None:
        """Kunlun's defaults, set before vLLM derives its own from them: piecewise graphs
        (vLLM's default has full ones), and the eager compile backend (with Inductor, vLLM
        would turn custom ops off)."""
        from vllm.config import CUDAGraphMode

        compilation_config = vllm_config.compilation_config
        if compilation_config.cudagraph_mode is None:
            compilation_config.cudagraph_mode = CUDAGraphMode.PIECEWISE
        if compilation_config.backend != COMPILE_BACKEND:
            logger.warning(
                "torch.compile backend %r is not available on Kunlun XPUs (no Inductor or "
                "Triton code generation); using %r.",
                compilation_config.backend,
                COMPILE_BACKEND,
            )
            compilation_config.backend = COMPILE_BACKEND

    @classmethod
    def check_and_update_config(cls, vllm_config: "VllmConfig") -> None:
        if vllm_config.lora_config is not None:
            raise ValueError(LORA_REFUSAL)
        cls._check_kunlun_config(vllm_config)
        cls._compile_without_inductor(vllm_config.compilation_config)
        cls._piecewise_graphs_only(vllm_config)

    @classmethod
    def _compile_without_inductor(cls, compilation_config: "CompilationConfig") -> None:
        """Eager backend, every custom op on, no fusion passes (KUNLUN.md §1.6)."""
        compilation_config.backend = COMPILE_BACKEND
        compilation_config.use_inductor_graph_partition = False
        custom_ops = compilation_config.custom_ops
        if "none" in custom_ops:
            custom_ops.remove("none")
        if "all" not in custom_ops:
            custom_ops.append("all")
        # The fusion passes rewrite graphs for Inductor's code generation.
        pass_config = compilation_config.pass_config
        for field in fields(pass_config):
            name = field.name
            if name.startswith("fuse_") or name == "enable_qk_norm_rope_fusion":
                setattr(pass_config, name, False)

    @classmethod
    def _piecewise_graphs_only(cls, vllm_config: "VllmConfig") -> None:
        """Kunlun captures piecewise graphs only (KUNLUN.md §1.6, §3.2); --enforce-eager
        captures none. vLLM later turns PIECEWISE off when the compile mode cannot split."""
        from vllm.config import CUDAGraphMode

        compilation_config = vllm_config.compilation_config
        model_config = vllm_config.model_config
        if model_config is not None and model_config.enforce_eager:
            compilation_config.cudagraph_mode = CUDAGraphMode.NONE
            return
        mode = compilation_config.cudagraph_mode
        if mode.has_full_cudagraphs():
            logger.warning(
                "Kunlun XPUs capture piecewise graphs only (attention runs outside the "
                "graphs); using cudagraph_mode PIECEWISE instead of %s.",
                mode.name,
            )
            compilation_config.cudagraph_mode = CUDAGraphMode.PIECEWISE
        # None: vLLM fills in its attention ops itself once the platform's checks are done.
        splitting_ops = compilation_config.splitting_ops
        if splitting_ops is not None:
            splitting_ops.extend(op for op in ATTENTION_SPLITTING_OPS if op not in splitting_ops)
