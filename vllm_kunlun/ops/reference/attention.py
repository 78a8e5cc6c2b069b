"""Attention over the paged KV cache, written as the math: softmax(q k^T * scale + mask) v.

Each request's keys and values are gathered from its blocks into a dense, padded
[requests, kv_heads, length, head_size] tensor; queries are grouped per KV head (GQA/MQA); one
mask carries causality, sequence ends and the sliding window.
"""

import torch


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, max_seq_len: int) -> torch.Tensor:
    """[num_blocks, Hkv, block_size, D] pages -> [requests, Hkv, padded_len, D] per request."""
    block_size = cache.shape[2]
    num_blocks = -(-max_seq_len // block_size)
    pages = cache[block_table[:, :num_blocks].long()]  # [R, n, Hkv, bs, D]
    requests, _, kv_heads, _, head_size = pages.shape
    return pages.transpose(1, 2).reshape(requests, kv_heads, num_blocks * block_size, head_size)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    softcap: float,
) -> torch.Tensor:
    """q [R, Hkv, G, Q, D], k/v [R, Hkv, L, D], allowed [R, Q, L] -> [R, Hkv, G, Q, D] float32."""
    scores = torch.einsum("rhgqd,rhld->rhgql", q.float(), k.float()) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed[:, None, None], torch.finfo(torch.float32).min)
    # Slots past a sequence's end hold stale memory: a NaN there would survive 0 * NaN.
    past_end = torch.arange(v.shape[2], device=v.device) >= seq_lens[:, None]
    v = v.float().masked_fill(past_end[:, None, :, None], 0.0)
    return torch.einsum("rhgql,rhld->rhgqd", scores.softmax(dim=-1), v)


def _allowed_keys(
    query_positions: torch.Tensor, seq_lens: torch.Tensor, kv_len: int, sliding_window: int
) -> torch.Tensor:
    """[R, Q] absolute query positions -> [R, Q, L] mask of the keys each query may see."""
    key_positions = torch.arange(kv_len, device=seq_lens.device)
    allowed = key_positions <= query_positions[..., None]  # causal
    allowed &= key_positions < seq_lens[:, None, None]
    if sliding_window > 0:
        allowed &= key_positions > query_positions[..., None] - sliding_window
    return allowed


def decode_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    scale: float,
    sliding_window: int,
    softcap: float,
) -> None:
    """One new token per request. query/out: [R, H, D]; seq_lens includes the new token."""
    requests, heads, head_size = query.shape
    kv_heads = key_cache.shape[1]
    k = gather_kv(key_cache, block_table, max_seq_len)
    v = gather_kv(value_cache, block_table, max_seq_len)
    q = query.view(requests, kv_heads, heads // kv_heads, 1, head_size)
    positions = (seq_lens - 1)[:, None]
    allowed = _allowed_keys(positions, seq_lens, k.shape[2], sliding_window)
    o = attend(q, k, v, allowed, seq_lens, scale, softcap)
    out.copy_(o.reshape(requests, heads, head_size))


def prefill_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    sliding_window: int,
    softcap: float,
) -> None:
    """Any number of new tokens per request, after cached context (chunked prefill, prefix hits).

    query/out: [T, H, D], request r owns rows query_start_loc[r]:query_start_loc[r+1], the last
    tokens of its seq_lens[r]; its earlier tokens are read from the cache like the new ones.
    """
    num_tokens, heads, head_size = query.shape
    kv_heads = key_cache.shape[1]
    requests = seq_lens.shape[0]
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    request_of_token = torch.repeat_interleave(
        torch.arange(requests, device=query.device), query_lens, output_size=num_tokens
    )
    row_in_request = (
        torch.arange(num_tokens, device=query.device) - query_start_loc[request_of_token]
    )

    padded = query.new_zeros(requests, max_query_len, heads, head_size)
    padded[request_of_token, row_in_request] = query
    q = padded.view(requests, max_query_len, kv_heads, heads // kv_heads, head_size)
    q = q.permute(0, 2, 3, 1, 4)  # [R, Hkv, G, Q, D]

    k = gather_kv(key_cache, block_table, max_seq_len)
    v = gather_kv(value_cache, block_table, max_seq_len)
    context_lens = seq_lens - query_lens
    positions = context_lens[:, None] + torch.arange(max_query_len, device=query.device)
    allowed = _allowed_keys(positions, seq_lens, k.shape[2], sliding_window)
    o = attend(q, k, v, allowed, seq_lens, scale, softcap).permute(
        0, 3, 1, 2, 4
    )  # [R, Q, Hkv, G, D]
    o = o.reshape(requests, max_query_len, heads, head_size)
    out.copy_(o[request_of_token, row_in_request])
