"""Which Kunlun device this process runs on: the real XPU runtime, the emulated one, or none."""

import functools

from vllm_kunlun import envs
from vllm_kunlun.device.base import DeviceRuntime
from vllm_kunlun.device.emulated import EmulatedRuntime
from vllm_kunlun.device.xpu import XpuRuntime, runtime_present


def detect() -> DeviceRuntime | None:
    """The runtime to use, without caching: a real XPU wins; emulation only when asked for."""
    if runtime_present():
        return XpuRuntime()
    if envs.emulation_requested():
        return EmulatedRuntime()
    return None


@functools.cache
def current_runtime() -> DeviceRuntime:
    runtime = detect()
    if runtime is None:
        raise RuntimeError(
            "No Kunlun XPU runtime was found (no /dev/xpuN device nodes). To run vllm-kunlun "
            "on this machine's CPU, set VLLM_KUNLUN_EMULATE=1."
        )
    return runtime


__all__ = ["DeviceRuntime", "EmulatedRuntime", "XpuRuntime", "current_runtime", "detect"]
