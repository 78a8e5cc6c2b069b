"""The worker for a real Kunlun XPU: vLLM's GPU worker, unchanged.

Needs a Kunlun XPU; not yet run on hardware. Under xpytorch XPUs are torch `cuda` devices, so
vLLM's GPU worker and model runner drive them as the public Kunlun plugin does (KUNLUN.md §1.4).
"""

from vllm.v1.worker.gpu_worker import Worker

from vllm_kunlun.worker import on_worker_start


class KunlunWorker(Worker):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        on_worker_start(rank=self.rank)
