"""Counting host syncs: calls that make the host wait for a device value.

On an accelerator, reading a tensor's value on the host (`.item()`, `bool(t)`, `int(t)`), a
boolean-mask index (its output size depends on the data), `nonzero`, `repeat_interleave`
without `output_size`, or a copy to host memory (`.cpu()`, `.tolist()`) blocks the host until
the device catches up, and cannot be captured in a device graph. The counter sees these at the
aten level, so it works on the CPU too, where the same calls are what would sync on a device;
the one exception is a copy to the host, which a host tensor does not make (counted on devices
only).
"""

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: Ops whose result the host must read, or whose output shape depends on tensor data.
SYNCING = {
    aten._local_scalar_dense.default,
    aten.item.default,
    aten.is_nonzero.default,
    aten.nonzero.default,
    aten.nonzero_static.default,
    aten.masked_select.default,
    aten.unique_consecutive.default,
    aten._unique2.default,
    aten.equal.default,
    aten.allclose.default,
}


def _has_bool_index(indices) -> bool:
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices or ())


def _device_to_host(packet, args, kwargs) -> bool:
    """A copy from a device tensor into host memory. On the CPU there is no such copy, so
    `.tolist()` / `.cpu()` of a host tensor cannot be counted there: only on a device."""
    if packet is aten.copy_:
        destination, source = args[0], args[1]
        return source.device.type != "cpu" and destination.device.type == "cpu"
    target = kwargs.get("device")
    return (
        args[0].device.type != "cpu" and target is not None and torch.device(target).type == "cpu"
    )


class HostSyncCounter(TorchDispatchMode):
    """Within `with HostSyncCounter() as counter:`, counter.total is the number of host syncs,
    counter.by_op says which aten ops caused them."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._syncs(func, args, kwargs):
            self.by_op[str(func.overloadpacket.__name__)] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _syncs(func, args, kwargs) -> bool:
        if func in SYNCING:
            return True
        packet = func.overloadpacket
        if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
            return _has_bool_index(args[1] if len(args) > 1 else kwargs.get("indices"))
        if packet is aten.repeat_interleave:  # a tensor of repeats and no output_size
            return func._overloadname != "self_int" and kwargs.get("output_size") is None
        if packet in (aten._to_copy, aten.copy_):  # device -> host copies (.cpu(), .tolist())
            return _device_to_host(packet, args, kwargs)
        return False
