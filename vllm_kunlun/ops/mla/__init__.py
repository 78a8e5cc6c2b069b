"""MLA family: Multi-head Latent Attention (DeepSeek-V2/V3) over the paged latent cache.

Each token keeps one cache row [kv_lora_rank latent | rope dims] (576 = 512 + 64 for
DeepSeek-V3), shared by every head: the cache is [num_blocks, block_size, L + R]. Decode runs
"absorbed" attention over those rows (the query already multiplied into the latent space);
prefill runs ordinary attention over keys and values up-projected from the latent rows, its
cached context gathered from the pages chunk by chunk and merged with the new tokens' attention
through the log-sum-exp (natural log, Kunlun's convention) of each part.
"""

import torch

from vllm_kunlun.ops.declare import kernel_op


@kernel_op(mutates_args=("kv_cache",))
def concat_and_cache_mla(
    kv_c: torch.Tensor,
    k_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write each token's cache row [kv_c | k_pe] into its slot.

    kv_c: [T, L]; k_pe: [T, R]; kv_cache: [num_blocks, block_size, L + R]; slot_mapping: [T],
    slot = block * block_size + offset; negative slots (padding) are skipped.
    """


@kernel_op(mutates_args=("out",))
def mla_decode(
    out: torch.Tensor,
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    seq_lens_cpu: torch.Tensor,
    max_seq_len: int,
    kv_lora_rank: int,
    scale: float,
) -> None:
    """One new token per request, absorbed: out[r] = softmax(q[r] . rows * scale) rows[:, :L].

    query: [R, H, L + R'] (the latent query, then the rope part), out: [R, H, L]; every head
    attends the same cache rows of its request (seq_lens[r] of them, the new token included);
    block_table: [R, blocks]; max_seq_len = max(seq_lens).
    """


@kernel_op(mutates_args=("out",))
def mla_gather_cache(
    out: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    token_to_seq: torch.Tensor,
    seq_starts: torch.Tensor,
) -> None:
    """Copy cached rows of several requests into one packed buffer (a prefill's context).

    out: [N, L + R] with N = cu_seq_lens[-1]; request r's rows go to out[cu_seq_lens[r] :
    cu_seq_lens[r + 1]] and are its positions seq_starts[r], seq_starts[r] + 1, ...;
    token_to_seq[i] is the request of row i; block_table: [requests, blocks].
    """


@kernel_op(mutates_args=("out", "lse"))
def mla_prefill(
    out: torch.Tensor,
    lse: torch.Tensor | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_start_loc: torch.Tensor,
    query_start_loc_cpu: torch.Tensor,
    key_start_loc: torch.Tensor,
    key_start_loc_cpu: torch.Tensor,
    max_query_len: int,
    max_key_len: int,
    scale: float,
    causal: bool,
) -> None:
    """Attention of packed queries over packed keys and values, request by request.

    query: [T, H, Dqk]; key: [S, H, Dqk]; value: [S, H, Dv]; out: [T, H, Dv]; request r owns
    query rows query_start_loc[r]:query_start_loc[r + 1] and key rows key_start_loc[r]:...;
    causal aligns the last query with the last key (query i sees keys up to i + S_r - T_r);
    lse (optional): [H, T] float32, the natural-log sum of exp(scores) per query and head,
    -inf where a query sees no key (out is 0 there).
    """


@kernel_op(mutates_args=("out", "out_lse"))
def merge_attention_states(
    out: torch.Tensor,
    out_lse: torch.Tensor | None,
    prefix_out: torch.Tensor,
    prefix_lse: torch.Tensor,
    suffix_out: torch.Tensor,
    suffix_lse: torch.Tensor,
) -> None:
    """Combine attention over two disjoint key sets from their outputs and log-sum-exps.

    *_out: [T, H, D]; *_lse: [H, T] float32, natural log; out = (e^p prefix + e^s suffix) /
    (e^p + e^s) per query and head, out_lse = log(e^p + e^s); 0 and -inf where both are -inf.
    out must not alias the inputs.
    """
