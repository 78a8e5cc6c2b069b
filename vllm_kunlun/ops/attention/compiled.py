"""Emulated-device fast path for decode attention (csrc/decode_attention.cpp): reads the KV
pages in place rather than gathering copies. Prefill and encoder attention run the reference
(torch's fused attention); tensors on a real device take the reference too."""

import torch

from vllm_kunlun.ops.attention import reference
from vllm_kunlun.ops.build import load_kernels, on_host


def prepare() -> None:
    load_kernels()


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
    if not on_host(query):
        reference.decode_attention(
            out, query, key_cache, value_cache, block_table, seq_lens, seq_lens_cpu,
            max_seq_len, max_model_len, scale, sliding_window, softcap,
        )  # fmt: skip
        return
    load_kernels().decode_attention(
        out, query, key_cache, value_cache, block_table.to(torch.int32),
        seq_lens.to(torch.int32).contiguous(), scale, sliding_window, softcap,
    )  # fmt: skip
