"""Attention over the paged KV cache: softmax(q k^T * scale + mask) v.

Each request's keys and values are gathered from its blocks into a dense, padded
[requests, kv_heads, length, head_size] tensor; one boolean mask per request carries causality,
the sequence end and the sliding window. Query heads share KV heads in groups (GQA/MQA).
Scores and softmax are float32; the probabilities meet V in the model dtype, as in Hugging
Face's eager attention. Encoder-only models attend within each packed sequence, both ways,
without a cache (`encoder_attention`).
"""

import torch
import torch.nn.functional as F


def _page_rows(cache: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The cache as rows of [block_size, D] (one per block and head), and rows per block.

    A K or V cache may be a strided view (the plugin interleaves K and V pages); its
    [block_size, D] rows still sit at a fixed stride, so one flat view reaches all of them.
    """
    num_blocks, kv_heads, block_size, head_size = cache.shape
    row = cache.stride(1)
    if cache.stride()[1:] != (block_size * head_size, head_size, 1) or cache.stride(0) % row:
        cache = cache.contiguous()
        row = block_size * head_size
    rows_per_block = cache.stride(0) // row
    num_rows = (num_blocks - 1) * rows_per_block + kv_heads
    return cache.as_strided((num_rows, block_size, head_size), (row, head_size, 1)), rows_per_block


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, max_seq_len: int) -> torch.Tensor:
    """[num_blocks, Hkv, block_size, D] pages -> [requests, Hkv, padded_len, D] per request.

    One copy, straight into the final layout: row ids broadcast to [requests, Hkv, blocks], so
    each request's pages for a head land next to each other.
    """
    _, kv_heads, block_size, head_size = cache.shape
    rows, rows_per_block = _page_rows(cache)
    num_blocks = -(-max_seq_len // block_size)
    blocks = block_table[:, None, :num_blocks].long() * rows_per_block
    ids = blocks + torch.arange(kv_heads, device=cache.device)[None, :, None]
    pages = rows.index_select(0, ids.reshape(-1))
    return pages.view(block_table.shape[0], kv_heads, num_blocks * block_size, head_size)


def allowed_keys(
    query_positions: torch.Tensor, seq_lens: torch.Tensor, kv_len: int, sliding_window: int
) -> torch.Tensor:
    """[R, Q] absolute query positions -> [R, Q, L] mask of the keys each query may see."""
    key_positions = torch.arange(kv_len, device=seq_lens.device)
    allowed = key_positions <= query_positions[..., None]  # causal
    allowed &= key_positions < seq_lens[:, None, None]
    if sliding_window > 0:
        allowed &= key_positions > query_positions[..., None] - sliding_window
    return allowed


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor | None,
    seq_lens: torch.Tensor,
    scale: float,
    softcap: float,
) -> torch.Tensor:
    """q [R, H, Q, D], k/v [R, Hkv, L, D] (gathered copies), allowed [R, Q, L] or None (every
    key visible to every query) -> [R, H, Q, D].

    The query heads that share a KV head are stacked as extra query rows, [R, Hkv, G * Q, D], so
    each KV head is read once per group. Without soft-capping this is torch's fused attention
    (float32 scores and softmax inside, whatever the model dtype); soft-capping needs the formula.
    """
    # Slots past a sequence's end hold stale memory: a NaN there would survive 0 * NaN. The
    # mask is built on the device from seq_lens: reading lengths back would sync the host.
    past_end = torch.arange(v.shape[2], device=v.device) >= seq_lens[:, None]
    v.masked_fill_(past_end[:, None, :, None], 0.0)

    requests, heads, num_queries, head_size = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    grouped = q.reshape(requests, kv_heads, group * num_queries, head_size)
    mask = None
    if allowed is not None:
        # Row g * Q + i of a group is query i: its mask row is allowed[:, i].
        mask = allowed[:, None].expand(requests, group, num_queries, kv_len)
        mask = mask.reshape(requests, 1, group * num_queries, kv_len)
    if softcap <= 0:
        out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=scale)
        return out.reshape(requests, heads, num_queries, head_size)  # strided on some devices
    scores = torch.matmul(grouped.float(), k.transpose(-1, -2).float()) * scale
    scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
    probs = scores.softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(requests, heads, num_queries, head_size)


def _token_places(
    query_start_loc: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed tokens, each token's request and its row within that request."""
    requests = query_start_loc.shape[0] - 1
    lengths = query_start_loc[1:] - query_start_loc[:-1]
    device = query_start_loc.device
    request_of_token = torch.repeat_interleave(
        torch.arange(requests, device=device), lengths, output_size=num_tokens
    )
    row_in_request = torch.arange(num_tokens, device=device) - query_start_loc[request_of_token]
    return request_of_token, row_in_request


def _pad(
    packed: torch.Tensor, places: tuple[torch.Tensor, torch.Tensor], requests: int, rows: int
) -> torch.Tensor:
    """[T, H, D] packed tokens at `places` (from _token_places) -> [R, rows, H, D], zero past
    each request's end."""
    padded = packed.new_zeros(requests, rows, *packed.shape[1:])
    padded[places] = packed
    return padded


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
    """One new token per request. query/out: [R, H, D]; seq_lens includes the new token.
    Host copies and max_model_len size vendor kernels; the reference needs neither."""
    # Whole blocks are gathered; keys past max_seq_len are never visible, so leave them out.
    k = gather_kv(key_cache, block_table, max_seq_len)[:, :, :max_seq_len]
    v = gather_kv(value_cache, block_table, max_seq_len)[:, :, :max_seq_len]
    # The new token is the last one: causality is just "before the sequence end".
    key_positions = torch.arange(max_seq_len, device=query.device)
    allowed = key_positions < seq_lens[:, None]
    if sliding_window > 0:
        allowed &= key_positions >= (seq_lens - sliding_window)[:, None]
    o = attend(query.unsqueeze(2), k, v, allowed[:, None], seq_lens, scale, softcap)
    out.copy_(o.squeeze(2))


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
    """Any number of new tokens per request, after cached context (chunked prefill, prefix hits).

    query/out: [T, H, D], request r owns rows query_start_loc[r]:query_start_loc[r+1], the last
    tokens of its seq_lens[r]; its earlier tokens are read from the cache like the new ones.
    """
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    places = _token_places(query_start_loc, query.shape[0])
    padded = _pad(query, places, seq_lens.shape[0], max_query_len)
    k = gather_kv(key_cache, block_table, max_seq_len)
    v = gather_kv(value_cache, block_table, max_seq_len)
    context_lens = seq_lens - query_lens
    positions = context_lens[:, None] + torch.arange(max_query_len, device=query.device)
    allowed = allowed_keys(positions, seq_lens, k.shape[2], sliding_window)
    o = attend(padded.transpose(1, 2), k, v, allowed, seq_lens, scale, softcap)  # [R, H, Q, D]
    out.copy_(o.transpose(1, 2)[places])


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
    """Bidirectional attention within each packed sequence (encoder-only models); no KV cache.

    query/out: [T, H, D], key/value: [T, Hkv, D]; request r owns rows
    query_start_loc[r]:query_start_loc[r+1] and every one of its tokens sees all of them.
    """
    num_tokens = query.shape[0]
    if num_tokens == 0:
        return
    places = _token_places(query_start_loc, num_tokens)
    requests = query_start_loc.shape[0] - 1
    q, k, v = (_pad(t, places, requests, max_query_len).transpose(1, 2)
               for t in (query, key, value))  # fmt: skip
    lengths = query_start_loc[1:] - query_start_loc[:-1]
    allowed = torch.arange(max_query_len, device=query.device) < lengths[:, None]
    o = F.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed[:, None, None, :], scale=scale, enable_gqa=True
    )  # [R, H, Q, D]
    out.copy_(o.transpose(1, 2)[places])
