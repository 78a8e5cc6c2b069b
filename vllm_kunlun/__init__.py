"""vllm-kunlun: the vLLM hardware plugin for Baidu Kunlun XPUs.

vLLM calls `register` (entry point group `vllm.platform_plugins`) to ask whether this plugin's
platform should be active, and `register_ops` (group `vllm.general_plugins`) in every process to
let the plugin register its layers, attention backend and quantized linear kernels.
"""

__version__ = "0.1.0"

#: The platform classes `register` can hand to vLLM: one per device runtime.
EMULATED_PLATFORM_PATH = "vllm_kunlun.platform.emulated.EmulatedKunlunPlatform"
XPU_PLATFORM_PATH = "vllm_kunlun.platform.xpu.KunlunPlatform"
PLATFORM_PATHS = (EMULATED_PLATFORM_PATH, XPU_PLATFORM_PATH)

_ops_registered = False


def register() -> str | None:
    """The platform class path for the detected Kunlun device (a real XPU, or the emulated one
    when VLLM_KUNLUN_EMULATE=1), else None."""
    from vllm_kunlun import device
    from vllm_kunlun.compat import check_vllm_version

    runtime = device.detect()
    if runtime is None:
        return None
    try:
        check_vllm_version()
    except RuntimeError as error:
        # vLLM logs a failing platform plugin only at DEBUG and falls back to another platform.
        from vllm_kunlun.log import get_logger

        get_logger("plugin").error("%s", error)
        raise
    return runtime.platform_cls


def register_ops() -> None:
    """Register the plugin's layers and attention backend with vLLM (idempotent).

    Does nothing unless a Kunlun platform (emulated or XPU) is the active one, so installing the
    plugin never changes vLLM's behaviour on other platforms.
    """
    global _ops_registered
    if _ops_registered:
        return
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    if f"{platform_cls.__module__}.{platform_cls.__qualname__}" not in PLATFORM_PATHS:
        return
    from vllm_kunlun.attention import register_backend
    from vllm_kunlun.layers import register_layers
    from vllm_kunlun.ops import stats
    from vllm_kunlun.quantization import register_quantization

    register_layers()
    register_backend()
    register_quantization()
    stats.install_exit_hook()
    _ops_registered = True
