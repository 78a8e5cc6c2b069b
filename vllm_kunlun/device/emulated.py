"""Emulated Kunlun XPUs: devices with a fixed memory budget each that compute on the host CPU.

VLLM_KUNLUN_EMULATED_DEVICES says how many there are (default 1, a single-XPU host); each has
its own VLLM_KUNLUN_EMULATED_MEMORY_GIB. Budgets are caps, not reservations: host RAM is used
only by the devices that workers bind to, one worker process per device.
"""

import psutil

from vllm_kunlun import envs
from vllm_kunlun.device.base import DeviceRuntime

GiB = 1 << 30


class EmulatedRuntime(DeviceRuntime):
    name = "Kunlun P800 (emulated on the host CPU)"
    torch_device_type = "cpu"
    dist_backend = "gloo"
    is_host = True
    platform_cls = "vllm_kunlun.platform.emulated.EmulatedKunlunPlatform"
    worker_cls = "vllm_kunlun.worker.emulated.EmulatedKunlunWorker"
    communicator_cls = "vllm_kunlun.distributed.communicator.KunlunCommunicator"

    #: Upper bound on VLLM_KUNLUN_EMULATED_DEVICES: each device is a worker process.
    MAX_DEVICES = 64

    def __init__(self) -> None:
        # Bytes the plugin has placed on each emulated device (weights, KV cache).
        self._in_use: dict[int, int] = {}
        #: The emulated device this process is bound to (set_device), None until bound.
        self.current_device: int | None = None

    def physical_device_count(self) -> int:
        raw = envs.VLLM_KUNLUN_EMULATED_DEVICES.get()
        try:
            count = int(raw)
        except ValueError:
            count = 0
        if not 1 <= count <= self.MAX_DEVICES:
            raise ValueError(
                f"VLLM_KUNLUN_EMULATED_DEVICES={raw!r} is not a device count between 1 and "
                f"{self.MAX_DEVICES}. Set it to the number of emulated XPUs you need (for "
                "example 2 for --tensor-parallel-size 2)."
            )
        return count

    def total_memory(self, index: int = 0) -> int:
        raw = envs.VLLM_KUNLUN_EMULATED_MEMORY_GIB.get()
        try:
            gib = float(raw)
        except ValueError:
            raise ValueError(
                f"VLLM_KUNLUN_EMULATED_MEMORY_GIB={raw!r} is not a number of GiB "
                "(for example 4 or 0.5)."
            ) from None
        if gib <= 0:
            raise ValueError(f"VLLM_KUNLUN_EMULATED_MEMORY_GIB must be positive, got {raw!r}.")
        budget = int(gib * GiB)
        host = psutil.virtual_memory().total
        if budget > host:
            raise ValueError(
                f"VLLM_KUNLUN_EMULATED_MEMORY_GIB={raw} asks for more than the host's "
                f"{host / GiB:.1f} GiB of RAM, which backs the emulated device. Lower it."
            )
        return budget

    def free_memory(self, index: int = 0) -> int:
        return max(0, self.total_memory(index) - self._in_use.get(index, 0))

    def record_allocation(self, index: int, nbytes: int) -> None:
        """Account bytes placed on emulated device `index` (negative to release)."""
        self._in_use[index] = max(0, self._in_use.get(index, 0) + nbytes)

    def set_device(self, index: int) -> None:
        count = self.physical_device_count()
        if not 0 <= index < count:
            raise ValueError(
                f"Emulated XPU {index} does not exist ({count} emulated); raise "
                "VLLM_KUNLUN_EMULATED_DEVICES."
            )
        self.current_device = index

    def synchronize(self) -> None:
        # Host computation is synchronous.
        return None

    def how_to_see_more_devices(self, needed: int) -> str:
        count = self.physical_device_count()
        emulated = f"This host emulates VLLM_KUNLUN_EMULATED_DEVICES={count} XPU(s)"
        if count >= needed:
            return f"{emulated}: unset or widen XPU_VISIBLE_DEVICES"
        return (
            f"{emulated}: set VLLM_KUNLUN_EMULATED_DEVICES={needed} (each gets "
            "VLLM_KUNLUN_EMULATED_MEMORY_GIB of memory), with XPU_VISIBLE_DEVICES unset or "
            "naming as many"
        )
