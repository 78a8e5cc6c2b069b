"""MLA in plain PyTorch: the specification of the family's kernels (see __init__.py).

Scores, softmax and sums are float32 whatever the model dtype; results are cast once at the end.
Padded copies per request keep every decision on the device: lengths are only compared with
position ranges, never read back to the host.
"""

import torch

from vllm_kunlun.ops.attention.reference import _pad, _token_places
from vllm_kunlun.ops.kv_cache.reference import padding_safe_slots


def concat_and_cache_mla(
    kv_c: torch.Tensor,
    k_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if slot_mapping.numel() == 0:
        return
    token, slots, any_real = padding_safe_slots(slot_mapping)
    block_size = kv_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    rows = torch.cat((kv_c[token], k_pe[token]), dim=-1).to(kv_cache.dtype)
    kv_cache[blocks, offsets] = torch.where(any_real, rows, kv_cache[blocks, offsets])


def gather_rows(kv_cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """[num_blocks, block_size, W] pages -> [requests, length, W]: each request's first rows."""
    block_size = kv_cache.shape[1]
    num_blocks = -(-length // block_size)
    pages = kv_cache[block_table[:, :num_blocks].long().clamp(min=0)]
    return pages.flatten(1, 2)[:, :length]


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
    rows = gather_rows(kv_cache, block_table, max_seq_len).float()  # [R, S, L + R']
    # Rows past a sequence's end are stale memory: a NaN there would survive a zero weight.
    visible = torch.arange(max_seq_len, device=rows.device) < seq_lens[:, None]  # [R, S]
    rows = torch.where(visible[..., None], rows, 0.0)
    scores = torch.einsum("rhw,rsw->rhs", query.float(), rows) * scale
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    # A request without keys (seq_lens 0, padding) gets 0, not the NaN of an all -inf softmax.
    probs = torch.where(visible[:, None], scores.softmax(dim=-1), 0.0)
    out.copy_(torch.einsum("rhs,rsl->rhl", probs, rows[..., :kv_lora_rank]))


def mla_gather_cache(
    out: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    token_to_seq: torch.Tensor,
    seq_starts: torch.Tensor,
) -> None:
    num_rows = out.shape[0]
    if num_rows == 0:
        return
    block_size = kv_cache.shape[1]
    request = token_to_seq[:num_rows].long()
    position = seq_starts[request] + torch.arange(num_rows, device=out.device)
    position = position - cu_seq_lens[request]
    block = block_table[request, position // block_size].long()
    out.copy_(kv_cache[block, position % block_size])


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
    num_tokens = query.shape[0]
    if num_tokens == 0:
        return
    requests = query_start_loc.shape[0] - 1
    query_places = _token_places(query_start_loc, num_tokens)
    key_places = _token_places(key_start_loc, key.shape[0])
    q = _pad(query, query_places, requests, max_query_len).float()  # [R, Q, H, D]
    k = _pad(key, key_places, requests, max_key_len).float()
    v = _pad(value, key_places, requests, max_key_len).float()

    query_lens = (query_start_loc[1:] - query_start_loc[:-1])[:, None, None]
    key_lens = (key_start_loc[1:] - key_start_loc[:-1])[:, None, None]
    query_pos = torch.arange(max_query_len, device=q.device)[None, :, None]
    key_pos = torch.arange(max_key_len, device=q.device)[None, None, :]
    allowed = key_pos < key_lens  # [R, Q, K]
    if causal:
        allowed = allowed & (key_pos <= query_pos + key_lens - query_lens)

    scores = torch.einsum("rqhd,rkhd->rhqk", q, k) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    row_lse = torch.logsumexp(scores, dim=-1)  # [R, H, Q], -inf where no key is visible
    probs = torch.exp(scores - row_lse.nan_to_num(neginf=0.0)[..., None])
    o = torch.einsum("rhqk,rkhd->rqhd", probs, v)
    out.copy_(o[query_places])
    if lse is not None:
        lse.copy_(row_lse.transpose(1, 2)[query_places].transpose(0, 1))


def merge_attention_states(
    out: torch.Tensor,
    out_lse: torch.Tensor | None,
    prefix_out: torch.Tensor,
    prefix_lse: torch.Tensor,
    suffix_out: torch.Tensor,
    suffix_lse: torch.Tensor,
) -> None:
    prefix_lse, suffix_lse = prefix_lse.float(), suffix_lse.float()
    top = torch.maximum(prefix_lse, suffix_lse).nan_to_num(neginf=0.0)  # [H, T]
    prefix_weight = torch.exp(prefix_lse - top)
    suffix_weight = torch.exp(suffix_lse - top)
    total = prefix_weight + suffix_weight
    safe_total = torch.where(total > 0, total, 1.0)
    prefix_share = (prefix_weight / safe_total).transpose(0, 1)[..., None]  # [T, H, 1]
    suffix_share = (suffix_weight / safe_total).transpose(0, 1)[..., None]
    out.copy_(prefix_out.float() * prefix_share + suffix_out.float() * suffix_share)
    if out_lse is not None:
        out_lse.copy_(torch.log(total) + top)
