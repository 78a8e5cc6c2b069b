"""The vLLM platforms of vllm-kunlun: one per kind of Kunlun device.

- `EmulatedKunlunPlatform` (emulated.py): an emulated XPU on the host CPU, built on vLLM's
  CpuPlatform.
- `KunlunPlatform` (xpu.py): a real Kunlun XPU, built on vLLM's Platform. Needs a Kunlun XPU;
  verified only by tests/test_platform_xpu.py with a faked runtime.

Both take what they share from `KunlunPlatformBase` (base.py). `vllm_kunlun.register` names the
one that matches the detected device runtime.
"""

import importlib

_CLASSES = {
    "EmulatedKunlunPlatform": "vllm_kunlun.platform.emulated",
    "KunlunPlatform": "vllm_kunlun.platform.xpu",
    "KunlunPlatformBase": "vllm_kunlun.platform.base",
}


def __getattr__(name: str):
    # Imported on first use: a Kunlun host never needs vLLM's CpuPlatform module, nor an
    # emulating host the XPU one.
    if name in _CLASSES:
        return getattr(importlib.import_module(_CLASSES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_CLASSES)
