import torch


def _rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, is_neox: bool
) -> None:
    """Rotate the first `rotary_dim` features of every head of x [T, heads, head_size] in place.

    NeoX pairs feature i with i + rotary_dim/2; GPT-J pairs neighbours 2i and 2i+1.
    """
    rot = x[..., :rotary_dim]
    if is_neox:
        first, second = rot.chunk(2, dim=-1)
    else:
        first, second = rot[..., 0::2], rot[..., 1::2]
    a, b = first.float(), second.float()
    new_first = (a * cos).sub_(b * sin)
    new_second = (b * cos).add_(a * sin)
    first.copy_(new_first)
    second.copy_(new_second)


def _heads_of_both(query: torch.Tensor, key: torch.Tensor, num_tokens: int, head_size: int):
    """query and key as one [T, Hq + Hk, head_size] view, or None.

    vLLM splits a fused qkv projection into views where each token's key heads directly follow
    its query heads; rotating both in one pass then halves the number of kernel launches.
    """
    q = query.view(num_tokens, -1, head_size)
    k = key.view(num_tokens, -1, head_size)
    row = q.stride(0)
    adjacent = (
        q.dtype == k.dtype
        and q.stride() == (row, head_size, 1)
        and k.stride() == (row, head_size, 1)
        and query.untyped_storage().data_ptr() == key.untyped_storage().data_ptr()
        and key.storage_offset() == query.storage_offset() + q.shape[1] * head_size
    )
    if not adjacent:
        return None
    return query.as_strided((num_tokens, q.shape[1] + k.shape[1], head_size), (row, head_size, 1))


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    """Apply rotary position embedding to query and key in place.

    positions: [T]; query: [T, H * head_size] or [T, H, head_size]; key likewise or None;
    cos_sin_cache: [max_position, rotary_dim] = [cos | sin]. Features past rotary_dim pass through.
    """
    positions = positions.flatten()
    num_tokens = positions.shape[0]
    cos, sin = cos_sin_cache.index_select(0, positions).float().chunk(2, dim=-1)
    rotary_dim = cos_sin_cache.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    both = None if key is None else _heads_of_both(query, key, num_tokens, head_size)
    targets = [both] if both is not None else [t for t in (query, key) if t is not None]
    for tensor in targets:
        _rotate(tensor.view(num_tokens, -1, head_size), cos, sin, rotary_dim, is_neox)
