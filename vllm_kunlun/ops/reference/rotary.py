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
    new_first = a * cos - b * sin
    new_second = b * cos + a * sin
    first.copy_(new_first)
    second.copy_(new_second)


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
    for tensor in (query, key):
        if tensor is not None:
            _rotate(tensor.view(num_tokens, -1, head_size), cos, sin, rotary_dim, is_neox)
