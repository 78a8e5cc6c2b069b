"""The Kunlun XPU runtime (XRE + xpytorch).

Needs a Kunlun XPU: nothing in this module has run on hardware yet. It follows what the public
Kunlun plugin does (KUNLUN.md §1.4-1.5): under xpytorch, XPUs appear to torch as `cuda` devices,
collectives use the "nccl" backend name (served by BKCL), and memory queries go through
`torch.cuda`. Unlike that plugin, total memory is the device's HBM, never host RAM.
"""

import glob
from typing import TYPE_CHECKING

from vllm_kunlun.device.base import DeviceRuntime

if TYPE_CHECKING:
    import torch


def xpu_device_nodes() -> list[str]:
    """The /dev/xpuN device nodes the Kunlun driver creates, one per XPU."""
    return sorted(p for p in glob.glob("/dev/xpu[0-9]*") if p[len("/dev/xpu") :].isdigit())


def runtime_present() -> bool:
    return bool(xpu_device_nodes())


class XpuRuntime(DeviceRuntime):
    name = "Kunlun P800"
    torch_device_type = "cuda"
    dist_backend = "nccl"
    is_host = False
    platform_cls = "vllm_kunlun.platform.xpu.KunlunPlatform"
    worker_cls = "vllm_kunlun.worker.xpu.KunlunWorker"
    communicator_cls = "vllm_kunlun.distributed.communicator.KunlunCommunicator"

    def physical_device_count(self) -> int:
        return len(xpu_device_nodes())

    def total_memory(self, index: int = 0) -> int:
        import torch

        return torch.cuda.get_device_properties(index).total_memory

    def free_memory(self, index: int = 0) -> int:
        import torch

        free, _total = torch.cuda.mem_get_info(index)
        return free

    def allocated_memory(self, device: "torch.types.Device" = None) -> int:
        """Bytes torch has allocated on `device` (the current XPU when None) right now.

        Through the two calls the public Kunlun plugin makes (KUNLUN.md §1.5): after a peak
        reset, the peak is the current allocation.
        """
        import torch

        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.max_memory_allocated(device)

    def set_device(self, index: int) -> None:
        import torch

        torch.cuda.set_device(index)

    def synchronize(self) -> None:
        import torch

        torch.cuda.synchronize()

    def how_to_see_more_devices(self, needed: int) -> str:
        count = self.physical_device_count()
        if count >= needed:
            return f"This host has {count} XPUs (/dev/xpuN): unset or widen XPU_VISIBLE_DEVICES"
        return (
            f"This host has {count} XPU(s) (/dev/xpuN): spread the workers over several hosts "
            "with --distributed-executor-backend ray (docs/distributed.md)"
        )
