"""vllm-kunlun: the vLLM hardware plugin for Baidu Kunlun XPUs.

vLLM calls `register` (entry point group `vllm.platform_plugins`) to ask whether this plugin's
platform should be active, and `register_ops` (group `vllm.general_plugins`) in every process to
let the plugin register its layers and attention backend.
"""

__version__ = "0.1.0"

PLATFORM_PATH = "vllm_kunlun.platform.KunlunPlatform"

_ops_registered = False


def register() -> str | None:
    """The platform class path when a Kunlun XPU or emulation is available, else None."""
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
    return PLATFORM_PATH


def register_ops() -> None:
    """Register the plugin's layers and attention backend with vLLM (idempotent).

    Does nothing unless the Kunlun platform is the active one, so installing the plugin never
    changes vLLM's behaviour on other platforms.
    """
    global _ops_registered
    if _ops_registered:
        return
    from vllm.platforms import current_platform

    if type(current_platform).__module__ != PLATFORM_PATH.rpartition(".")[0]:
        return
    from vllm_kunlun.attention import register_backend
    from vllm_kunlun.layers import register_layers
    from vllm_kunlun.ops import stats

    register_layers()
    register_backend()
    stats.install_exit_hook()
    _ops_registered = True
