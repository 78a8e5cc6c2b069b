"""Worker classes: vLLM's workers, subclassed for the Kunlun device runtimes."""


def on_worker_start(rank: int | None = None) -> None:
    """What every Kunlun worker does first: op accounting, and naming the kernel provider."""
    from vllm_kunlun.ops import stats
    from vllm_kunlun.ops.provider import current_provider

    if rank is not None:
        stats.set_rank(rank)
    stats.install_exit_hook()
    current_provider()  # logs which provider runs the kernels, once per process


def check_routes(model, rank: int) -> None:
    """After loading: log the model's route report and refuse a layer without a route."""
    from vllm_kunlun.routes import enforce_routes

    enforce_routes(model, rank=rank)
