"""The plugin's device ops, declared once as torch custom ops in the `kunlun` namespace.

Each op has a schema (from the type hints), a fake implementation so torch.compile can trace
through it, and a real implementation that counts the call and forwards to the kernel provider
chosen at start-up (vllm_kunlun.ops.provider). Call them as torch.ops.kunlun.<name> or through
the functions below.
"""

import torch
from torch.library import custom_op

from vllm_kunlun.ops import stats
from vllm_kunlun.ops.provider import current_provider


def _writes_in_place_only(*args, **kwargs) -> None:
    """Fake implementation of the ops that only mutate their arguments: no new tensors."""
    return None


@custom_op("kunlun::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    stats.record("rms_norm")
    return current_provider().rms_norm(x, weight, eps)


@rms_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


@custom_op("kunlun::fused_add_rms_norm", mutates_args=("x", "residual"))
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    stats.record("fused_add_rms_norm")
    current_provider().fused_add_rms_norm(x, residual, weight, eps)


@custom_op("kunlun::rotary_embedding", mutates_args=("query", "key"))
def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    stats.record("rotary_embedding")
    current_provider().rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)


@custom_op("kunlun::silu_and_mul", mutates_args=())
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    stats.record("silu_and_mul")
    return current_provider().silu_and_mul(x)


@silu_and_mul.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


@custom_op("kunlun::reshape_and_cache", mutates_args=("key_cache", "value_cache"))
def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    stats.record("reshape_and_cache")
    current_provider().reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


@custom_op("kunlun::decode_attention", mutates_args=("out",))
def decode_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    seq_lens_cpu: torch.Tensor,
    max_seq_len: int,
    max_model_len: int,
    scale: float,
    sliding_window: int,
    softcap: float,
) -> None:
    """One query token per request; see reference.decode_attention. `*_cpu` are host copies."""
    stats.record("decode_attention")
    current_provider().decode_attention(
        out, query, key_cache, value_cache, block_table, seq_lens, seq_lens_cpu,
        max_seq_len, max_model_len, scale, sliding_window, softcap,
    )  # fmt: skip


@custom_op("kunlun::prefill_attention", mutates_args=("out",))
def prefill_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    query_start_loc_cpu: torch.Tensor,
    seq_lens: torch.Tensor,
    seq_start_loc: torch.Tensor,
    seq_start_loc_cpu: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    sliding_window: int,
    softcap: float,
) -> None:
    """Varlen queries after cached context; see reference.prefill_attention."""
    stats.record("prefill_attention")
    current_provider().prefill_attention(
        out, query, key_cache, value_cache, block_table, query_start_loc, query_start_loc_cpu,
        seq_lens, seq_start_loc, seq_start_loc_cpu, max_query_len, max_seq_len,
        scale, sliding_window, softcap,
    )  # fmt: skip


for _op in (
    fused_add_rms_norm,
    rotary_embedding,
    reshape_and_cache,
    decode_attention,
    prefill_attention,
):
    _op.register_fake(_writes_in_place_only)
