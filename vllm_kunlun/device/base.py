"""The device seam: everything the plugin needs from a device runtime, in one small interface."""

from abc import ABC, abstractmethod


class DeviceRuntime(ABC):
    """One kind of Kunlun device: the real XPU runtime, or the emulated device on the host CPU.

    The platform, the worker and the communicator ask the runtime; nothing else in the plugin
    asks whether the device is emulated.
    """

    #: Human-readable device name, as `vllm_kunlun` reports it.
    name: str
    #: The torch device type tensors are allocated on ("cuda" under xpytorch, "cpu" emulated).
    torch_device_type: str
    #: torch.distributed backend for collectives between devices.
    dist_backend: str
    #: True when the device shares the host's memory and cores (vLLM's host-CPU code paths,
    #: such as thread binding and gloo collectives, then apply to it).
    is_host: bool
    #: Dotted path of the vLLM platform class for this device (what `vllm_kunlun.register`
    #: hands to vLLM).
    platform_cls: str
    #: Dotted path of the worker class vLLM instantiates per device.
    worker_cls: str
    #: Dotted path of the device communicator class.
    communicator_cls: str

    @abstractmethod
    def physical_device_count(self) -> int:
        """Devices present, before XPU_VISIBLE_DEVICES is applied."""

    @abstractmethod
    def total_memory(self, index: int = 0) -> int:
        """Bytes of device memory of device `index`."""

    @abstractmethod
    def free_memory(self, index: int = 0) -> int:
        """Bytes of device memory not in use on device `index`."""

    @abstractmethod
    def set_device(self, index: int) -> None:
        """Make device `index` current for this process."""

    @abstractmethod
    def synchronize(self) -> None:
        """Wait for all work queued on the current device."""

    @abstractmethod
    def how_to_see_more_devices(self, needed: int) -> str:
        """What the user can do to make `needed` devices visible on this host."""
