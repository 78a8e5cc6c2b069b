"""Reference kernels in plain PyTorch: the specification every other provider is tested against,
and the kernels the emulated device runs. Vectorized over the batch; no loops over requests."""

from vllm_kunlun.ops.reference.activation import gelu_and_mul, silu_and_mul
from vllm_kunlun.ops.reference.attention import (
    decode_attention,
    encoder_attention,
    prefill_attention,
)
from vllm_kunlun.ops.reference.kv_cache import reshape_and_cache
from vllm_kunlun.ops.reference.norm import fused_add_rms_norm, rms_norm
from vllm_kunlun.ops.reference.rotary import rotary_embedding

__all__ = [
    "decode_attention",
    "encoder_attention",
    "fused_add_rms_norm",
    "gelu_and_mul",
    "prefill_attention",
    "reshape_and_cache",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
]
