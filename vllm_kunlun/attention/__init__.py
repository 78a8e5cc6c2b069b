"""The Kunlun attention backend, registered in vLLM's attention backend registry as CUSTOM."""

BACKEND_PATH = "vllm_kunlun.attention.backend.KunlunAttentionBackend"


def register_backend() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.backends.registry import register_backend as vllm_register

    vllm_register(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
