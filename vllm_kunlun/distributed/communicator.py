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

#: vLLM all-to-all backends (--all2all-backend) the communicator serves: both names vLLM uses
#: for the all-gather / reduce-scatter scheme. The others are CUDA libraries (DeepEP, ...).
ALL2ALL_BACKENDS = ("allgather_reducescatter", "naive")


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
            self.all2all_manager = self._all2all_manager()
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

    def _all2all_manager(self):
        # None: no vLLM config in this process, so vLLM's default (allgather_reducescatter).
        if self.all2all_backend is not None and self.all2all_backend not in ALL2ALL_BACKENDS:
            raise ValueError(
                f"vllm-kunlun's expert-parallel all-to-all is vLLM's allgather_reducescatter "
                f"scheme; --all2all-backend {self.all2all_backend} needs CUDA libraries a Kunlun "
                "XPU does not have. Drop --all2all-backend (or pass allgather_reducescatter)."
            )
        from vllm.distributed.device_communicators.all2all import AgRsAll2AllManager

        return AgRsAll2AllManager(self.cpu_group)

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

    def all_gatherv(
        self,
        input_: torch.Tensor | list[torch.Tensor],
        dim: int = 0,
        sizes: list[int] | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Concatenate every rank's rows (dim 0); rank r contributes `sizes[r]` of them."""
        stats.record("comm.all_gatherv")
        if dim != 0:
            raise NotImplementedError("KunlunCommunicator.all_gatherv gathers along dim 0 only")
        if isinstance(input_, torch.Tensor):
            return self._all_gatherv(input_, sizes)
        return [self._all_gatherv(tensor, sizes) for tensor in input_]

    def _all_gatherv(self, tensor: torch.Tensor, sizes: list[int] | None) -> torch.Tensor:
        rows = tensor.shape[0]
        sizes = self._checked_sizes(sizes or [rows] * self.world_size, own_rows=rows)
        longest = max(sizes)
        padded = pad_rows(tensor.contiguous(), longest)
        gathered = torch.empty(
            (self.world_size * longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device
        )
        dist.all_gather_into_tensor(gathered, padded, group=self.device_group)
        if all(size == longest for size in sizes):
            return gathered
        return torch.cat([gathered[r * longest : r * longest + n] for r, n in enumerate(sizes)])

    def reduce_scatterv(
        self, input_: torch.Tensor, dim: int = -1, sizes: list[int] | None = None
    ) -> torch.Tensor:
        """Sum `input_` over the ranks; rank r keeps its `sizes[r]` rows (dim 0) of the sum."""
        stats.record("comm.reduce_scatterv")
        if dim not in (0, -input_.dim()):
            raise NotImplementedError("KunlunCommunicator.reduce_scatterv scatters along dim 0")
        if sizes is None:
            if input_.shape[0] % self.world_size:
                raise ValueError(
                    f"reduce_scatterv of {input_.shape[0]} rows over {self.world_size} ranks "
                    "needs the per-rank sizes"
                )
            sizes = [input_.shape[0] // self.world_size] * self.world_size
        sizes = self._checked_sizes(sizes)
        if sum(sizes) != input_.shape[0]:
            raise ValueError(f"reduce_scatterv sizes {sizes} do not add up to {input_.shape[0]}")
        longest = max(sizes)
        chunks = torch.split(input_, sizes, dim=0)
        padded = torch.cat([pad_rows(chunk, longest) for chunk in chunks]).contiguous()
        output = torch.empty((longest, *input_.shape[1:]), dtype=input_.dtype, device=input_.device)
        dist.reduce_scatter_tensor(output, padded, group=self.device_group)
        return output[: sizes[self.rank_in_group]]

    def _checked_sizes(self, sizes: list[int], own_rows: int | None = None) -> list[int]:
        """`sizes` (rows per rank), checked against the group and this rank's rows."""
        sizes = list(sizes)
        if len(sizes) != self.world_size:
            raise ValueError(f"{len(sizes)} sizes for a group of {self.world_size} ranks")
        if own_rows is not None and sizes[self.rank_in_group] != own_rows:
            raise ValueError(
                f"rank {self.rank_in_group} holds {own_rows} rows, but sizes say "
                f"{sizes[self.rank_in_group]}"
            )
        return sizes

    def dispatch_router_logits(
        self,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor,
        is_sequence_parallel: bool = False,
        extra_tensors: list[torch.Tensor] | None = None,
    ):
        """Every data-parallel rank's tokens and router logits, for the experts on this rank."""
        stats.record("comm.dispatch_router_logits")
        return self._manager().dispatch_router_logits(
            hidden_states, router_logits, is_sequence_parallel, extra_tensors
        )

    def dispatch(
        self,
        hidden_states: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        is_sequence_parallel: bool = False,
        extra_tensors: list[torch.Tensor] | None = None,
    ):
        stats.record("comm.dispatch")
        return self._manager().dispatch(
            hidden_states, topk_weights, topk_ids, is_sequence_parallel, extra_tensors
        )

    def combine(self, hidden_states: torch.Tensor, is_sequence_parallel: bool = False):
        """This rank's tokens of the expert output, summed over the ranks' experts."""
        stats.record("comm.combine")
        return self._manager().combine(hidden_states, is_sequence_parallel)

    def _manager(self):
        if self.all2all_manager is None:
            # vLLM's base class would return the input: wrong, silently, across ranks.
            raise RuntimeError(
                f"Group {self.unique_name!r} has no all-to-all: only the expert-parallel group "
                "of a data-parallel MoE run dispatches tokens"
            )
        return self.all2all_manager

    def destroy(self) -> None:
        # The process groups belong to vLLM's GroupCoordinator, which destroys them.
        return None


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with zero rows appended along dim 0 up to `rows` (itself if already there)."""
    missing = rows - tensor.shape[0]
    if missing == 0:
        return tensor
    return torch.cat([tensor, tensor.new_zeros((missing, *tensor.shape[1:]))])
