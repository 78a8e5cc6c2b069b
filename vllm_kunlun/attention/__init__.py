"""The Kunlun attention backends: KUNLUN (the CUSTOM slot of vLLM's registry) for ordinary
attention, KUNLUN_MLA for Multi-head Latent Attention, and the MLA prefill backend the platform
names for vLLM's MLA layer."""

BACKEND_PATH = "vllm_kunlun.attention.backend.KunlunAttentionBackend"
MLA_BACKEND_NAME = "KUNLUN_MLA"
MLA_BACKEND_PATH = "vllm_kunlun.attention.mla.KunlunMLABackend"


def register_backend() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.backends.registry import register_backend as vllm_register

    vllm_register(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    if MLA_BACKEND_NAME not in AttentionBackendEnum.__members__:  # registering twice raises
        vllm_register(MLA_BACKEND_NAME, MLA_BACKEND_PATH)
