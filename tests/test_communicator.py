"""KunlunCommunicator, emulated XPUs and the platform's distributed facts, without an engine.

The emulated path runs for real: two processes, gloo, every collective checked against its
definition. The XPU path (backend "nccl", served by BKCL under xpytorch) cannot run here; its
contract is checked with fakes: which torch.distributed call each collective makes, on which
group, after which start-up handshake.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vllm_kunlun.device import EmulatedRuntime, XpuRuntime
from vllm_kunlun.distributed import COMMUNICATOR_PATH
from vllm_kunlun.distributed.communicator import KunlunCommunicator
from vllm_kunlun.worker.host_cores import (
    core_shares,
    share_host_cores,
    use_the_cpu_backends_thread_count,
)

WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _NcclRuntime(EmulatedRuntime):
    """An emulated runtime that claims the XPU backend, to provoke the mismatch check."""

    name = "Kunlun P800"
    dist_backend = "nccl"


def _collectives_on_two_ranks(rank: int, port: int, results) -> None:
    from vllm_kunlun.ops import stats

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    cpu_group = dist.new_group([0, 1], backend="gloo")
    device_group = dist.new_group([0, 1], backend="gloo")
    comm = KunlunCommunicator(cpu_group, torch.device("cpu"), device_group, unique_name="tp:0",
                              runtime=EmulatedRuntime())  # fmt: skip
    out: dict = {"backend": comm.backend, "rank_in_group": comm.rank_in_group}

    x = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 10 * rank
    out["all_reduce"] = comm.all_reduce(x.clone())
    out["all_gather_last"] = comm.all_gather(x, dim=-1)
    out["all_gather_first"] = comm.all_gather(x, dim=0)
    out["reduce_scatter"] = comm.reduce_scatter(torch.ones(4, 2) * (rank + 1), dim=0)
    out["gather"] = comm.gather(x, dst=0, dim=0)
    out["broadcast"] = comm.broadcast(torch.full((3,), float(rank)), src=1)
    if rank == 0:
        comm.send(torch.tensor([7.0, 8.0]), dst=1)
    else:
        out["recv"] = comm.recv(torch.Size([2]), torch.float32, src=0)
    # Variable-size collectives (expert-parallel all-to-all): rank 0 has 3 rows, rank 1 has 1.
    sizes = [3, 1]
    rows = torch.arange(sizes[rank] * 2, dtype=torch.float32).reshape(-1, 2) + 100 * rank
    ids = torch.full((sizes[rank], 2), rank + 1, dtype=torch.int32)
    out["all_gatherv"], out["all_gatherv_ids"] = comm.all_gatherv([rows, ids], dim=0, sizes=sizes)
    out["all_gatherv_even"] = comm.all_gatherv(torch.full((2, 1), float(rank)), dim=0)
    summed_rows = torch.arange(8, dtype=torch.float32).reshape(4, 2) * (rank + 1)
    out["reduce_scatterv"] = comm.reduce_scatterv(summed_rows, dim=0, sizes=sizes)
    out["reduce_scatterv_even"] = comm.reduce_scatterv(summed_rows, dim=0)
    try:
        comm.all_gatherv(rows, dim=0, sizes=[2, 2])
    except ValueError as error:
        out["bad_sizes"] = str(error)
    try:
        comm.combine(rows)  # a TP group has no all-to-all: an error, never the input back
    except RuntimeError as error:
        out["no_all2all"] = str(error)
    out["stats"] = {k: v for k, v in stats.snapshot().items() if k.startswith("comm.")}
    try:
        KunlunCommunicator(cpu_group, torch.device("cpu"), device_group, unique_name="tp:1",
                           runtime=_NcclRuntime())  # fmt: skip
    except RuntimeError as error:
        out["mismatch"] = str(error)
    # Plain lists: a queued tensor would live in this process's shared memory, gone at exit.
    results.put(
        (rank, {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in out.items()})
    )
    dist.barrier()
    dist.destroy_process_group()


def test_emulated_collectives_over_gloo_match_their_definitions():
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_collectives_on_two_ranks, args=(_free_port(), results), nprocs=WORLD,
                       start_method="spawn")  # fmt: skip
    by_rank = {}
    for _ in range(WORLD):
        rank, out = results.get()
        by_rank[rank] = {k: torch.tensor(v) if isinstance(v, list) else v for k, v in out.items()}
    x0 = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    x1 = x0 + 10
    for rank, out in by_rank.items():
        assert out["backend"] == "gloo" and out["rank_in_group"] == rank
        torch.testing.assert_close(out["all_reduce"], x0 + x1)
        torch.testing.assert_close(out["all_gather_last"], torch.cat([x0, x1], dim=-1))
        torch.testing.assert_close(out["all_gather_first"], torch.cat([x0, x1], dim=0))
        # Sum over ranks (1 + 2 = 3), then each rank keeps its half of dim 0.
        torch.testing.assert_close(out["reduce_scatter"], torch.full((2, 2), 3.0))
        torch.testing.assert_close(out["broadcast"], torch.ones(3))
        # Every collective went through the Kunlun communicator (and its op accounting).
        assert out["stats"]["comm.all_reduce"] == 1
        assert out["stats"]["comm.all_gather"] == 2
        assert "need 'nccl'" in out["mismatch"] and "'gloo' backend" in out["mismatch"]
    torch.testing.assert_close(by_rank[0]["gather"], torch.cat([x0, x1], dim=0))
    assert by_rank[1]["gather"] is None

    # all_gatherv: rank 0's 3 rows then rank 1's 1 row, on every rank, for each tensor.
    rows0 = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    rows1 = torch.arange(2, dtype=torch.float32).reshape(1, 2) + 100
    ids = torch.tensor([[1, 1]] * 3 + [[2, 2]], dtype=torch.int32)
    # reduce_scatterv: the sum over ranks (x * 1 + x * 2) split 3 rows / 1 row.
    summed = torch.arange(8, dtype=torch.float32).reshape(4, 2) * 3
    for rank, out in by_rank.items():
        torch.testing.assert_close(out["all_gatherv"], torch.cat([rows0, rows1]))
        assert out["all_gatherv_ids"].tolist() == ids.tolist()
        torch.testing.assert_close(
            out["all_gatherv_even"], torch.tensor([[0.0], [0.0], [1.0], [1.0]])
        )
        torch.testing.assert_close(out["reduce_scatterv"], summed[:3] if rank == 0 else summed[3:])
        torch.testing.assert_close(out["reduce_scatterv_even"], summed[2 * rank : 2 * rank + 2])
        assert "sizes say 2" in out["bad_sizes"]
        assert "has no all-to-all" in out["no_all2all"]
        assert out["stats"]["comm.all_gatherv"] == 3 and out["stats"]["comm.reduce_scatterv"] == 2
    torch.testing.assert_close(by_rank[1]["recv"], torch.tensor([7.0, 8.0]))


# The XPU contract, with fakes ----------------------------------------------------------------


class _FakeGroup:
    def __init__(self, name: str, rank: int = 1, size: int = 2) -> None:
        self.name, self._rank, self._size = name, rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


class _RecordingRuntime(XpuRuntime):
    def __init__(self) -> None:
        self.synchronized = 0

    def synchronize(self) -> None:
        self.synchronized += 1


@pytest.fixture
def fake_dist(monkeypatch):
    """torch.distributed as seen by the communicator: records calls, reduces as 2 ranks would."""
    calls: list[tuple[str, str | None]] = []

    def record(name):
        def call(*args, group=None, **kwargs):
            group = (
                group
                if group is not None
                else next((a for a in args if isinstance(a, _FakeGroup)), None)
            )
            calls.append((name, getattr(group, "name", None)))
            if name == "all_reduce":
                args[0].mul_(WORLD)

        return call

    names = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "gather",
             "broadcast", "send", "recv")  # fmt: skip
    for name in names:
        monkeypatch.setattr(dist, name, record(name))
    monkeypatch.setattr(dist, "get_backend", lambda group: "nccl")
    return calls


def _xpu_communicator(runtime=None) -> KunlunCommunicator:
    return KunlunCommunicator(
        _FakeGroup("cpu"), torch.device("cpu"), _FakeGroup("device"), unique_name="tp:0",
        global_ranks=[4, 5], global_world_size=8, runtime=runtime or _RecordingRuntime(),
    )  # fmt: skip


def test_xpu_communicator_warms_up_on_the_device_group_and_synchronizes(fake_dist):
    runtime = _RecordingRuntime()
    comm = _xpu_communicator(runtime)
    assert comm.backend == "nccl" == runtime.dist_backend
    assert fake_dist == [("all_reduce", "device")]
    assert runtime.synchronized == 1
    assert (comm.rank_in_group, comm.world_size, comm.ranks) == (1, 2, [4, 5])


def test_xpu_collectives_delegate_to_torch_distributed_on_the_device_group(fake_dist):
    comm = _xpu_communicator()
    fake_dist.clear()
    x = torch.ones(2, 4)
    assert comm.all_reduce(x) is x  # in place, as vLLM expects
    comm.all_gather(x, dim=-1)
    comm.reduce_scatter(x, dim=0)
    comm.gather(x, dst=0)
    comm.broadcast(x, src=0)
    comm.send(x, dst=0)
    comm.recv(torch.Size([2]), torch.float32, src=0)
    assert [name for name, _ in fake_dist] == [
        "all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "gather",
        "broadcast", "send", "recv",
    ]  # fmt: skip
    assert {group for _, group in fake_dist} == {"device"}  # never the CPU (gloo) group


def test_a_wrong_backend_or_a_failed_warm_up_stops_start_up(fake_dist, monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda group: "gloo")
    with pytest.raises(RuntimeError, match="uses the 'gloo' backend.*need 'nccl'"):
        _xpu_communicator()
    monkeypatch.setattr(dist, "get_backend", lambda group: "nccl")
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, group=None: None)  # sums nothing
    with pytest.raises(RuntimeError, match="returned 1.0 instead of 2"):
        _xpu_communicator()


def test_the_expert_parallel_group_dispatches_with_vllms_all_gather_reduce_scatter_manager(
    fake_dist, monkeypatch
):
    """Data parallel > 1 on an MoE model: the `ep` group's communicator gets vLLM's
    allgather_reducescatter manager and hands dispatch and combine to it."""
    from vllm.distributed.device_communicators import all2all

    class RecordingManager:
        def __init__(self, cpu_group) -> None:
            self.calls: list[str] = []

        def dispatch_router_logits(self, hidden, logits, is_sequence_parallel, extra):
            self.calls.append("dispatch_router_logits")
            return torch.cat([hidden, hidden]), torch.cat([logits, logits])

        def combine(self, hidden, is_sequence_parallel):
            self.calls.append("combine")
            return hidden[: hidden.shape[0] // 2]

    monkeypatch.setattr(all2all, "AgRsAll2AllManager", RecordingManager)
    comm = KunlunCommunicator(_FakeGroup("cpu"), torch.device("cpu"), _FakeGroup("device"),
                              unique_name="ep:0", global_ranks=[0, 1], global_world_size=2,
                              use_all2all=True, runtime=_RecordingRuntime())  # fmt: skip
    assert isinstance(comm.all2all_manager, RecordingManager)
    hidden, logits = comm.dispatch_router_logits(torch.ones(3, 4), torch.ones(3, 5))
    assert hidden.shape == (6, 4) and logits.shape == (6, 5)
    assert comm.combine(torch.ones(6, 4)).shape == (3, 4)
    assert comm.all2all_manager.calls == ["dispatch_router_logits", "combine"]


def test_an_all_to_all_backend_kunlun_lacks_is_refused_naming_it(fake_dist, monkeypatch):
    from vllm.config import ParallelConfig, VllmConfig, set_current_vllm_config

    config = VllmConfig(parallel_config=ParallelConfig(all2all_backend="deepep_low_latency"))
    with set_current_vllm_config(config), pytest.raises(ValueError, match="deepep_low_latency"):
        KunlunCommunicator(_FakeGroup("cpu"), torch.device("cpu"), _FakeGroup("device"),
                           unique_name="ep:0", global_ranks=[0, 1], global_world_size=2,
                           use_all2all=True, runtime=_RecordingRuntime())  # fmt: skip


# Runtime and platform facts ------------------------------------------------------------------


def test_both_runtimes_name_the_kunlun_communicator_and_their_backend():
    assert EmulatedRuntime.communicator_cls == XpuRuntime.communicator_cls == COMMUNICATOR_PATH
    assert (EmulatedRuntime.dist_backend, XpuRuntime.dist_backend) == ("gloo", "nccl")


def test_platform_ray_facts(monkeypatch):
    monkeypatch.setenv("VLLM_KUNLUN_EMULATE", "1")
    from vllm_kunlun.platform import EmulatedKunlunPlatform

    assert EmulatedKunlunPlatform.get_device_communicator_cls() == COMMUNICATOR_PATH
    assert EmulatedKunlunPlatform.dist_backend == "gloo"
    # vLLM's Ray workers look their device ids up under this key among Ray's accelerators.
    import ray._private.accelerators as ray_accelerators

    resource_names = ray_accelerators.get_all_accelerator_resource_names()
    assert EmulatedKunlunPlatform.ray_device_key in resource_names
    assert "XPU_VISIBLE_DEVICES" in EmulatedKunlunPlatform.additional_env_vars
    assert EmulatedKunlunPlatform.ray_noset_device_env_vars == [
        "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"
    ]


def test_emulated_device_count_selection_and_per_device_memory(monkeypatch):
    runtime = EmulatedRuntime()
    monkeypatch.delenv("VLLM_KUNLUN_EMULATED_DEVICES", raising=False)
    assert runtime.physical_device_count() == 1  # default: a single-XPU host
    for bad in ("two", "0", "65"):
        monkeypatch.setenv("VLLM_KUNLUN_EMULATED_DEVICES", bad)
        with pytest.raises(ValueError, match="VLLM_KUNLUN_EMULATED_DEVICES=.* between 1 and 64"):
            runtime.physical_device_count()
    monkeypatch.setenv("VLLM_KUNLUN_EMULATED_DEVICES", "4")
    monkeypatch.setenv("VLLM_KUNLUN_EMULATED_MEMORY_GIB", "1")
    assert runtime.physical_device_count() == 4
    runtime.set_device(3)
    assert runtime.current_device == 3
    with pytest.raises(ValueError, match="Emulated XPU 4 does not exist.*EMULATED_DEVICES"):
        runtime.set_device(4)
    runtime.record_allocation(2, 1 << 29)
    assert runtime.free_memory(2) == 1 << 29
    assert runtime.free_memory(1) == runtime.total_memory(1) == 1 << 30  # each its own budget
    assert "set VLLM_KUNLUN_EMULATED_DEVICES=8" in runtime.how_to_see_more_devices(8)
    assert "unset or widen XPU_VISIBLE_DEVICES" in runtime.how_to_see_more_devices(4)


def test_xpu_runtime_points_to_visible_devices_or_ray(monkeypatch):
    nodes = ["/dev/xpu0", "/dev/xpu1"]
    monkeypatch.setattr("vllm_kunlun.device.xpu.xpu_device_nodes", lambda: nodes)
    assert "unset or widen XPU_VISIBLE_DEVICES" in XpuRuntime().how_to_see_more_devices(2)
    hint = XpuRuntime().how_to_see_more_devices(4)
    assert "2 XPU(s)" in hint and "--distributed-executor-backend ray" in hint


def test_host_cores_are_shared_between_emulated_xpus(monkeypatch):
    assert core_shares([0, 1], 2) == [[0], [1]]
    assert core_shares([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    with pytest.raises(ValueError):
        core_shares([0], 2)

    import vllm.utils.cpu_resource_utils as cpu_resources

    monkeypatch.setattr(cpu_resources, "get_visible_memory_node", lambda: [0])
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    # setenv (not delenv) so monkeypatch restores the variable's absence afterwards: a binding
    # leaked into later tests' engines would name cores this machine may not have.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    share_host_cores(2)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # the user's choice stands
    share_host_cores(2)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    share_host_cores(8)  # more workers than cores: no binding rather than a failure
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"


def test_a_worker_in_the_engine_process_takes_the_cpu_backends_thread_count(monkeypatch):
    """All cores but one (vLLM's CPU backend keeps one for the scheduler), at least one; the
    user's OMP_NUM_THREADS stands."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        for cores, threads in (({0, 1, 2, 3}, 3), ({0, 1}, 1), ({5}, 1)):
            monkeypatch.setattr("os.sched_getaffinity", lambda pid, c=cores: c)
            assert use_the_cpu_backends_thread_count() == threads == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
        assert use_the_cpu_backends_thread_count() == torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
