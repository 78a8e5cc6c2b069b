"""What the rotary family's reference, compiled and Kunlun tests share: the cos/sin cache as vLLM
builds it, the plain formula (float64, feature pairs as complex numbers), and the set-up of the
scenarios both the reference and the compiled kernels are tested on."""

from dataclasses import dataclass

import torch

ROTARY_SHAPES = [  # (heads, kv heads, head_size, rotary_dim)
    (4, 2, 64, 64),
    (3, 1, 80, 32),  # partial rotary
    (2, 2, 128, 64),  # partial rotary
    (5, 5, 128, 128),
]


def rotary_shape_id(shape: tuple[int, int, int, int]) -> str:
    return "h{}kv{}d{}rot{}".format(*shape)


def make_cos_sin_cache(
    max_position: int, rotary_dim: int, dtype: torch.dtype, base: float = 10000.0
) -> torch.Tensor:
    """[max_position, rotary_dim] = [cos | sin], the layout vLLM's RotaryEmbedding builds."""
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype)


def plain_rotary(
    positions: torch.Tensor,
    x: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> torch.Tensor:
    """x [T, heads * head_size] -> rotated copy in float64: each feature pair, seen as a complex
    number, is multiplied by exp(i * angle) taken from the cache row of its token's position."""
    rotary_dim = cos_sin_cache.shape[-1]
    half = rotary_dim // 2
    pairs = [(j, j + half) if is_neox else (2 * j, 2 * j + 1) for j in range(half)]
    first, second = [a for a, _ in pairs], [b for _, b in pairs]
    out = x.double().reshape(x.shape[0], -1, head_size).clone()
    for token, position in enumerate(positions.tolist()):
        row = cos_sin_cache[position].double()
        turn = torch.complex(row[:half], row[half:])  # exp(i * angle_j), j < rotary_dim / 2
        z = torch.complex(out[token][:, first], out[token][:, second]) * turn  # [heads, half]
        out[token][:, first], out[token][:, second] = z.real, z.imag
    return out.reshape(x.shape)


@dataclass
class RotaryProblem:
    """One rotary_embedding call and its expected results (float64, from plain_rotary)."""

    positions: torch.Tensor
    query: torch.Tensor
    key: torch.Tensor | None
    head_size: int
    cache: torch.Tensor
    is_neox: bool
    expected_query: torch.Tensor
    expected_key: torch.Tensor | None

    def args(self) -> tuple:
        """The op's arguments, in its order."""
        return (self.positions, self.query, self.key, self.head_size, self.cache, self.is_neox)


def _problem(positions, query, key, head_size, cache, is_neox) -> RotaryProblem:
    expected_key = None if key is None else plain_rotary(positions, key, head_size, cache, is_neox)
    return RotaryProblem(positions, query, key, head_size, cache, is_neox,
                         plain_rotary(positions, query, head_size, cache, is_neox),
                         expected_key)  # fmt: skip


def flat_query_and_key(
    dtype: torch.dtype, is_neox: bool, num_tokens: int, shape: tuple[int, int, int, int]
) -> RotaryProblem:
    """Contiguous query [T, H * D] and key [T, Hkv * D] at random positions below 4096."""
    heads, kv_heads, head_size, rotary_dim = shape
    max_position = 4096
    cache = make_cos_sin_cache(max_position, rotary_dim, dtype)
    positions = torch.randint(0, max_position, (num_tokens,))
    query = torch.randn(num_tokens, heads * head_size).to(dtype)
    key = torch.randn(num_tokens, kv_heads * head_size).to(dtype)
    return _problem(positions, query, key, head_size, cache, is_neox)


#: (heads, kv heads, head_size, rotary_dim) of the fused-qkv scenario: partial rotary.
FUSED_QKV_SHAPE = (6, 2, 80, 40)


def fused_qkv_views(
    dtype: torch.dtype, is_neox: bool, num_tokens: int
) -> tuple[torch.Tensor, RotaryProblem]:
    """query and key as column slices of one [T, (H + 2 Hkv) * D] qkv tensor; returns the qkv
    tensor (whose other columns must stay untouched) and the problem over its views."""
    heads, kv_heads, head_size, rotary_dim = FUSED_QKV_SHAPE
    q_width, kv_width = heads * head_size, kv_heads * head_size
    cache = make_cos_sin_cache(2048, rotary_dim, dtype)
    positions = torch.randint(0, 2048, (num_tokens,))
    qkv = torch.randn(num_tokens, q_width + 2 * kv_width).to(dtype)
    query, key = qkv[:, :q_width], qkv[:, q_width : q_width + kv_width]
    return qkv, _problem(positions, query, key, head_size, cache, is_neox)
