"""Which host cores each emulated XPU computes on.

vLLM's multiprocessing executor binds each host-CPU worker's OpenMP threads to cores
(VLLM_CPU_OMP_THREADS_BIND). Its default, "auto", gives every worker a NUMA node of its own
and refuses more workers than NUMA nodes, so `--tensor-parallel-size 2` on an ordinary
single-node machine would fail. For emulated XPUs the plugin then splits the allowed cores
into one contiguous share per worker instead ("0|1" on two cores), unless the user chose a
binding.

A single emulated XPU's worker runs inside the engine process instead (EmulatedKunlunPlatform
keeps vLLM's "uni" executor), where nothing binds it: it takes the thread count vLLM's CPU
backend would give its worker process.
"""

import os

from vllm_kunlun.log import get_logger

logger = get_logger("worker")

BIND_VAR = "VLLM_CPU_OMP_THREADS_BIND"


def core_shares(cores: list[int], workers: int) -> list[list[int]]:
    """`cores` split into `workers` contiguous, near-equal, non-empty shares."""
    if workers > len(cores):
        raise ValueError(f"cannot give {workers} workers a core each out of {len(cores)}")
    base, extra = divmod(len(cores), workers)
    shares, start = [], 0
    for index in range(workers):
        size = base + (1 if index < extra else 0)
        shares.append(cores[start : start + size])
        start += size
    return shares


def share_host_cores(local_workers: int) -> None:
    """Set VLLM_CPU_OMP_THREADS_BIND so `local_workers` emulated XPUs each get their own cores.

    Leaves an explicit user binding, and vLLM's NUMA binding when there are enough NUMA
    nodes, alone. With fewer cores than workers, threads are left unbound ("nobind").
    """
    from vllm import envs as vllm_envs
    from vllm.utils.cpu_resource_utils import get_visible_memory_node

    if local_workers <= 1 or vllm_envs.VLLM_CPU_OMP_THREADS_BIND != "auto":
        return

    if len(get_visible_memory_node()) >= local_workers:
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < local_workers:
        binding = "nobind"
    else:
        shares = core_shares(cores, local_workers)
        binding = "|".join(",".join(str(core) for core in share) for share in shares)
    os.environ[BIND_VAR] = binding
    logger.info(
        "%d emulated XPUs share %d host core(s): %s=%s.",
        local_workers, len(cores), BIND_VAR, binding,
    )  # fmt: skip


def use_the_cpu_backends_thread_count() -> int:
    """Compute with the thread count vLLM's CPU backend gives its one worker process: the
    host's cores but one, kept for the scheduler, so the plugin and the in-tree backend are
    benchmarked like with like. An OMP_NUM_THREADS set by the user wins, as in vLLM. Call it
    before CPUWorker.init_device, which disables torch.set_num_threads. Returns the count."""
    import torch

    if "OMP_NUM_THREADS" in os.environ:  # vLLM's CPU backend honours it too
        return torch.get_num_threads()
    threads = max(1, len(os.sched_getaffinity(0)) - 1)
    if torch.get_num_threads() != threads:
        logger.info("The emulated XPU computes with %d host thread(s).", threads)
        torch.set_num_threads(threads)
    return threads
