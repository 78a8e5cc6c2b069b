"""Encoder-only attention (reference.encoder_attention) against the plain formula: every token of
a packed sequence attends to every token of its own sequence and to nothing else."""

import pytest
import torch

from tests.test_reference_kernels import DTYPES, HEAD_LAYOUTS, assert_close_to, plain_attention
from vllm_kunlun.ops import reference

LENGTHS = [[1], [5, 1, 33], [17, 64, 2, 2]]  # one token; mixed; padding-heavy batches
HEAD_SIZES = [32, 80]


def packed_qkv(
    lengths: list[int], heads: int, kv_heads: int, head_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as views of one fused projection, as the model hands them over."""
    total = sum(lengths)
    fused = torch.randn(total, (heads + 2 * kv_heads) * head_size).to(dtype)
    q, k, v = fused.split([heads * head_size, kv_heads * head_size, kv_heads * head_size], -1)
    return (q.view(total, heads, head_size), k.view(total, kv_heads, head_size),
            v.view(total, kv_heads, head_size))  # fmt: skip


def plain_encoder(q, k, v, lengths: list[int], scale: float) -> torch.Tensor:
    """Sequence by sequence: the last position sees every key, so ask plain_attention for it at
    every query row."""
    outputs, start = [], 0
    for length in lengths:
        rows = slice(start, start + length)
        outputs.append(plain_attention(q[rows], [length - 1] * length, k[rows], v[rows],
                                       scale, -1, 0.0))  # fmt: skip
        start += length
    return torch.cat(outputs)


def run(q, k, v, lengths: list[int], scale: float) -> torch.Tensor:
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    reference.encoder_attention(out, q, k, v, starts, max(lengths), scale)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("heads,kv_heads", HEAD_LAYOUTS)
@pytest.mark.parametrize("head_size", HEAD_SIZES)
def test_encoder_attention_matches_the_formula(dtype, lengths, heads, kv_heads, head_size):
    torch.manual_seed(0)
    q, k, v = packed_qkv(lengths, heads, kv_heads, head_size, dtype)
    scale = head_size**-0.5
    assert_close_to(run(q, k, v, lengths, scale), plain_encoder(q, k, v, lengths, scale), dtype)


def test_the_first_token_sees_the_last_and_sequences_do_not_mix():
    torch.manual_seed(0)
    lengths = [6, 4]
    q, k, v = packed_qkv(lengths, 4, 2, 32, torch.float32)
    before = run(q, k, v, lengths, 0.2)
    k[5], v[5] = k[5] * 3, v[5] + 1  # the last token of the first sequence
    after = run(q, k, v, lengths, 0.2)
    assert not torch.allclose(after[0], before[0]), "attention must look ahead (bidirectional)"
    torch.testing.assert_close(after[6:], before[6:])  # the second sequence is untouched


def test_an_empty_batch_writes_nothing():
    out = torch.zeros(0, 4, 32)
    empty = torch.zeros(0, 4, 32)
    reference.encoder_attention(out, empty, empty, empty, torch.tensor([0]), 0, 0.1)
    assert out.shape == (0, 4, 32)
