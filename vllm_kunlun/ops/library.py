"""The plugin's device ops, declared once as torch custom ops in the `kunlun` namespace.

Each op has a schema (from the type hints), a fake implementation so torch.compile can trace
through it, and an implementation that counts the call and forwards to the kernel provider
chosen at start-up (vllm_kunlun.ops.provider). The functions below are what layers and the
attention backend call: while torch.compile traces they emit torch.ops.kunlun.<name>; in eager
mode they run the implementation directly, skipping the dispatcher's per-call cost.
"""

import functools
import inspect
from collections.abc import Callable

import torch

from vllm_kunlun.ops import stats
from vllm_kunlun.ops.provider import current_provider


def _writes_in_place_only(*args, **kwargs) -> None:
    """Fake implementation of the ops that only mutate their arguments: no new tensors."""
    return None


def _same_as_first_input(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return torch.empty_like(x)


def _half_of_last_dim(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


def _op(
    mutates_args: tuple[str, ...] = (), fake: Callable = _writes_in_place_only
) -> Callable[[Callable], Callable]:
    """Declare the decorated function as torch.ops.kunlun.<its name>."""

    def declare(impl: Callable) -> Callable:
        name = impl.__name__

        def counted(*args, **kwargs):
            stats.record(name)
            return impl(*args, **kwargs)

        counted.__signature__ = inspect.signature(impl)
        counted.__annotations__ = impl.__annotations__
        custom = torch.library.custom_op(f"kunlun::{name}", counted, mutates_args=mutates_args)
        custom.register_fake(fake)

        @functools.wraps(impl)
        def call(*args, **kwargs):
            if torch.compiler.is_compiling():
                return custom(*args, **kwargs)
            return counted(*args, **kwargs)

        return call

    return declare


@_op(fake=_same_as_first_input)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return current_provider().rms_norm(x, weight, eps)


@_op(mutates_args=("x", "residual"))
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    current_provider().fused_add_rms_norm(x, residual, weight, eps)


@_op(mutates_args=("query", "key"))
def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    current_provider().rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)


@_op(fake=_half_of_last_dim)
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return current_provider().silu_and_mul(x)


@_op(fake=_half_of_last_dim)
def gelu_and_mul(x: torch.Tensor, approximate: str) -> torch.Tensor:
    return current_provider().gelu_and_mul(x, approximate)


@_op(mutates_args=("key_cache", "value_cache"))
def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    current_provider().reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


@_op(mutates_args=("out",))
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
    current_provider().decode_attention(
        out, query, key_cache, value_cache, block_table, seq_lens, seq_lens_cpu,
        max_seq_len, max_model_len, scale, sliding_window, softcap,
    )  # fmt: skip


@_op(mutates_args=("out",))
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
    current_provider().prefill_attention(
        out, query, key_cache, value_cache, block_table, query_start_loc, query_start_loc_cpu,
        seq_lens, seq_start_loc, seq_start_loc_cpu, max_query_len, max_seq_len,
        scale, sliding_window, softcap,
    )  # fmt: skip


@_op(mutates_args=("out",))
def encoder_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_start_loc: torch.Tensor,
    query_start_loc_cpu: torch.Tensor,
    max_query_len: int,
    scale: float,
) -> None:
    """Bidirectional attention in packed sequences, no cache; see reference.encoder_attention."""
    current_provider().encoder_attention(
        out, query, key, value, query_start_loc, query_start_loc_cpu, max_query_len, scale
    )
