"""Attention family: paged decode and prefill attention, and cache-free encoder attention.

Host ("_cpu") copies of lengths and offsets travel next to the device tensors because Kunlun's
kernels take both (KUNLUN.md C3); the attention metadata builds them once per step. Every
data-dependent decision a kernel needs on the host (max_seq_len, max_query_len) arrives as a
plain int from the metadata, so no kernel reads a device tensor back to the host.
"""

import torch

from vllm_kunlun.ops.declare import kernel_op


@kernel_op(mutates_args=("out",))
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
    """One new token per request: out[r] = softmax(q[r] k^T * scale) v over its cached keys.

    query/out: [R, H, D]; caches [num_blocks, Hkv, block_size, D]; block_table [R, blocks];
    seq_lens [R] includes the new token; max_seq_len = max(seq_lens); max_model_len sizes vendor
    kernels; sliding_window <= 0 and softcap <= 0 mean none.
    """


@kernel_op(mutates_args=("out",))
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
    """Causal attention of new tokens after cached context (chunked prefill, prefix hits).

    query/out: [T, H, D]; request r owns rows query_start_loc[r]:query_start_loc[r+1], the last
    tokens of its seq_lens[r]; its earlier tokens are read from the cache like the new ones.
    seq_start_loc = [0, cumsum(seq_lens)] (Kunlun's kv "lod").
    """


@kernel_op(mutates_args=("out",))
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
    """Bidirectional attention within each packed sequence (encoder-only models), no cache.

    query/out: [T, H, D], key/value: [T, Hkv, D]; every token of a request sees all of them.
    """
