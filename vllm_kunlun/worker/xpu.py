"""The worker for a real Kunlun XPU: vLLM's GPU worker, plus the route report after loading.

Needs a Kunlun XPU; not yet run on hardware. Under xpytorch XPUs are torch `cuda` devices, so
vLLM's GPU worker and model runner drive them as the public Kunlun plugin does (KUNLUN.md §1.4).
"""

from vllm.v1.worker.gpu_worker import Worker

from vllm_kunlun.worker import OpStatsMixin, check_routes, global_rank, on_worker_start


class KunlunWorker(OpStatsMixin, Worker):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        on_worker_start(rank=global_rank(self.parallel_config, self.rank))

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        check_routes(self.model_runner.get_model(), global_rank(self.parallel_config, self.rank))
