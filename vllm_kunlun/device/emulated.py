"""The emulated Kunlun XPU: a device with a fixed memory budget that computes on the host CPU."""

import psutil

from vllm_kunlun import envs
from vllm_kunlun.device.base import DeviceRuntime

GiB = 1 << 30


class EmulatedRuntime(DeviceRuntime):
    name = "Kunlun P800 (emulated on the host CPU)"
    torch_device_type = "cpu"
    dist_backend = "gloo"
    is_host = True
    worker_cls = "vllm_kunlun.worker.emulated.EmulatedKunlunWorker"
    communicator_cls = "vllm.distributed.device_communicators.cpu_communicator.CpuCommunicator"

    def __init__(self) -> None:
        # Bytes the plugin has placed on each emulated device (weights, KV cache).
        self._in_use: dict[int, int] = {}

    def physical_device_count(self) -> int:
        return 1

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
            raise ValueError(f"Emulated XPU {index} does not exist ({count} emulated).")

    def synchronize(self) -> None:
        # Host computation is synchronous.
        return None
