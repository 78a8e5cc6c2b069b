"""Kunlun binding of the attention family (KUNLUN.md §2d, §3). Needs a Kunlun XPU;
contract-tested only. Assumptions (KUNLUN.md §4):

- speculative_attention (§4.6): only qlen=1 decodes are issued, with a 3-D `out`; batches of
  about 1024 requests and more are known to fail on the recorded build (§3.4).
- sliding window (§4.7): vLLM's window is passed unchanged as swa_left / max_window_size, as the
  recorded plugin does; whether the kernels count the current token the same way is unchecked.
- prefill_attention scales scores by 1/sqrt(head_dim) itself, then by alpha.
- Logit soft-capping has no recorded kernel parameter: softcap > 0 raises NotImplementedError.
- Host copies (C3) are assumed to be read at launch: graph capture would freeze them (§3.2),
  which is why attention is a splitting op of piecewise graphs.
"""

import torch

from vllm_kunlun.ops.kunlun_library import (
    attention_alpha,
    check_keywords,
    dense,
    int32,
    library,
    write_back,
)
from vllm_kunlun.ops.kv_cache.kunlun import PagedKV

KEYWORDS = {
    "speculative_attention": (
        "out", "q", "k_cache", "v_cache", "context_lens_cpu", "context_lens_xpu", "batch_num",
        "qlen", "max_context_len", "head_num", "head_dim", "scale", "kv_head_num", "block_size",
        "max_num_blocks_per_seq", "max_window_size", "block_tables", "sink",
    ),
    "prefill_attention": (
        "q", "k", "v", "out", "is_causal", "alpha", "context_qlen_lod_cpu",
        "context_qlen_lod_xpu", "alibi_slopes", "softmax_lse", "swa_left", "swa_right", "sink",
        "is_prefix_cache", "block_table", "context_kvlen_lod_cpu", "context_kvlen_lod_xpu",
    ),
}  # fmt: skip


def prepare() -> None:
    check_keywords(KEYWORDS)


def _window(sliding_window: int) -> int:
    return sliding_window if sliding_window > 0 else -1


def _no_softcap(softcap: float) -> None:
    if softcap > 0:
        raise NotImplementedError(
            f"Logit soft-capping (softcap={softcap}) has no known kunlun_ops parameter; run "
            "this model with VLLM_KUNLUN_KERNELS=reference (the reference kernels support it)."
        )


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
    _no_softcap(softcap)
    kv = PagedKV.of(key_cache, value_cache)
    batch, heads, head_size = query.shape
    block_tables = kv.block_table(block_table)
    dst = dense(out)
    library().speculative_attention(
        out=dst,
        q=dense(query).unsqueeze(0),
        k_cache=kv.k,
        v_cache=kv.v,
        context_lens_cpu=int32(seq_lens_cpu),
        context_lens_xpu=int32(seq_lens),
        batch_num=batch,
        qlen=1,
        max_context_len=max_model_len,
        head_num=heads,
        head_dim=head_size,
        scale=scale,
        kv_head_num=kv.k.shape[1],
        block_size=kv.block_size,
        max_num_blocks_per_seq=block_tables.shape[1],
        max_window_size=_window(sliding_window),
        block_tables=block_tables,
        sink=None,
    )
    write_back(out, dst)


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
    _no_softcap(softcap)
    kv = PagedKV.of(key_cache, value_cache)
    window = _window(sliding_window)
    dst = dense(out)
    library().prefill_attention(
        q=dense(query),
        k=kv.k,
        v=kv.v,
        out=dst,
        is_causal=True,
        alpha=attention_alpha(scale, query.shape[-1]),
        context_qlen_lod_cpu=int32(query_start_loc_cpu),
        context_qlen_lod_xpu=int32(query_start_loc),
        alibi_slopes=None,
        softmax_lse=None,
        swa_left=window,
        swa_right=0 if window > 0 else -1,
        sink=None,
        is_prefix_cache=True,
        block_table=kv.block_table(block_table),
        context_kvlen_lod_cpu=int32(seq_start_loc_cpu),
        context_kvlen_lod_xpu=int32(seq_start_loc),
    )
    write_back(out, dst)


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
    # The dense form with is_causal=False, as newer branches of the recorded plugin call it
    # for encoder-only models (KUNLUN.md, prefill_attention); queries are their own keys.
    dst = dense(out)
    library().prefill_attention(
        q=dense(query),
        k=dense(key),
        v=dense(value),
        out=dst,
        is_causal=False,
        alpha=attention_alpha(scale, query.shape[-1]),
        context_qlen_lod_cpu=int32(query_start_loc_cpu),
        context_qlen_lod_xpu=int32(query_start_loc),
        alibi_slopes=None,
        softmax_lse=None,
        swa_left=-1,
        swa_right=-1,
        sink=None,
    )
    write_back(out, dst)
