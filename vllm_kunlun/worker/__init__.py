"""Worker classes: vLLM's workers, subclassed for the Kunlun device runtimes."""


def on_worker_start(rank: int | None = None) -> None:
    """What every Kunlun worker does first: op accounting, and naming the kernel provider."""
    from vllm_kunlun.ops import stats
    from vllm_kunlun.ops.provider import current_provider

    if rank is not None:
        stats.set_rank(rank)
    stats.install_exit_hook()
    current_provider()  # logs which provider runs the kernels, once per process


class OpStatsMixin:
    """What both Kunlun workers add for op accounting."""

    def write_op_stats(self) -> str | None:
        """Write this worker's op counts now (see vllm_kunlun.ops.stats.write_now); for
        `LLM.collective_rpc("write_op_stats")`."""
        from vllm_kunlun.ops import stats

        return stats.write_now()


def check_routes(model, rank: int) -> None:
    """After loading: log the model's route report and refuse a layer without a route."""
    from vllm_kunlun.routes import enforce_routes

    enforce_routes(model, rank=rank)


def global_rank(parallel_config, rank: int) -> int:
    """A worker's rank across every data-parallel engine (`rank` counts within its engine),
    so each rank of a data-parallel run writes its own op-accounting file and route report."""
    return parallel_config.data_parallel_rank * parallel_config.world_size + rank


def data_parallel_device_offset(parallel_config) -> int:
    """How many of this host's devices the data-parallel engines before this one use.

    vLLM's GPU worker adds this to its local rank when one host runs several data-parallel
    engines (offline SPMD or `--data-parallel-size` on multiprocessing); Ray places each
    engine's workers itself."""
    if (
        parallel_config.data_parallel_size == 1
        or parallel_config.distributed_executor_backend in ("ray", "external_launcher")
        or parallel_config.data_parallel_backend == "ray"
        or parallel_config.nnodes_within_dp != 1
    ):
        return 0
    local_dp_rank = parallel_config.data_parallel_rank_local
    if local_dp_rank is None:
        local_dp_rank = parallel_config.data_parallel_index
    return local_dp_rank * parallel_config.world_size
