"""KunlunCommunicator: collectives between the Kunlun XPUs of one vLLM process group.

Every collective is a torch.distributed call on the group's `device_group`, whose backend is
the device runtime's `dist_backend`:

- on Kunlun XPUs, "nccl", which xpytorch serves with BKCL, the vendor collective library
  (KUNLUN.md §1.4, §2i). Needs a Kunlun XPU: not yet run on hardware;
- on emulated XPUs, "gloo" between the worker processes on the host.

So an emulated run drives the same communicator code as an XPU run; only the backend under
torch.distributed differs. vLLM's CUDA extras (custom all-reduce, symmetric memory, PyNccl)
are not used: BKCL is reached only through torch.distributed.
"""

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from vllm.distributed.device_communicators.base_device_communicator import (
    DeviceCommunicatorBase,
)

from vllm_kunlun.device import DeviceRuntime, current_runtime
from vllm_kunlun.log import get_logger
from vllm_kunlun.ops import stats

logger = get_logger("communicator")


def backend_of(group: ProcessGroup | None) -> str | None:
    """The torch.distributed backend name of `group` ("gloo", "nccl"), None if unknown."""
    if group is None:
        return None
    try:
        return str(dist.get_backend(group))
    except (RuntimeError, ValueError):  # not a group torch.distributed knows (stateless)
        return None


class KunlunCommunicator(DeviceCommunicatorBase):
    def __init__(
        self,
        cpu_group: ProcessGroup,
        device: torch.device | None = None,
        device_group: ProcessGroup | None = None,
        unique_name: str = "",
        global_ranks: list[int] | None = None,
        global_world_size: int | None = None,
        use_all2all: bool = False,
        runtime: DeviceRuntime | None = None,
    ) -> None:
        super().__init__(
            cpu_group, device, device_group, unique_name,
            global_ranks=global_ranks, global_world_size=global_world_size,
            use_all2all=use_all2all,
        )  # fmt: skip
        self.runtime = runtime or current_runtime()
        if self.use_all2all:
            raise NotImplementedError(
                "Expert-parallel all-to-all is not supported on Kunlun yet. Run MoE models "
                "without --enable-expert-parallel."
            )
        self.backend = backend_of(device_group)
        if self.backend is not None and self.backend != self.runtime.dist_backend:
            raise RuntimeError(
                f"Process group {unique_name!r} uses the {self.backend!r} backend, but "
                f"{self.runtime.name} collectives need {self.runtime.dist_backend!r}. Do not "
                "override vLLM's distributed backend on Kunlun."
            )
        self._warm_up()
        logger.debug(
            "KunlunCommunicator for %s: rank %d of %d, backend %s.",
            unique_name, self.rank_in_group, self.world_size, self.backend,
        )  # fmt: skip

    def _warm_up(self) -> None:
        """One tiny all-reduce, so a broken device group fails at start-up, not mid-request."""
        probe = torch.ones(1, device=self.device)
        dist.all_reduce(probe, group=self.device_group)
        self.runtime.synchronize()
        if int(probe.item()) != self.world_size:
            raise RuntimeError(
                f"The {self.backend} all-reduce across {self.world_size} Kunlun devices of group "
                f"{self.unique_name!r} returned {probe.item()} instead of {self.world_size}."
            )

    def all_reduce(self, input_: torch.Tensor) -> torch.Tensor:
        stats.record("comm.all_reduce")
        dist.all_reduce(input_, group=self.device_group)
        return input_

    def all_gather(self, input_: torch.Tensor, dim: int = -1) -> torch.Tensor:
        stats.record("comm.all_gather")
        return super().all_gather(input_, dim)

    def reduce_scatter(self, input_: torch.Tensor, dim: int = -1) -> torch.Tensor:
        stats.record("comm.reduce_scatter")
        return super().reduce_scatter(input_, dim)

    def gather(self, input_: torch.Tensor, dst: int = 0, dim: int = -1) -> torch.Tensor | None:
        stats.record("comm.gather")
        return super().gather(input_, dst, dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        stats.record("comm.broadcast")
        return super().broadcast(tensor, src)

    def send(self, tensor: torch.Tensor, dst: int | None = None) -> None:
        stats.record("comm.send")
        super().send(tensor, dst)

    def recv(self, size: torch.Size, dtype: torch.dtype, src: int | None = None) -> torch.Tensor:
        stats.record("comm.recv")
        return super().recv(size, dtype, src)

    def destroy(self) -> None:
        # The process groups belong to vLLM's GroupCoordinator, which destroys them.
        return None
