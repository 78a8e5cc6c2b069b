"""check-kernels cases of the MoE family: one token, fewer tokens than experts, top_k = experts,
idle experts, strided hidden states, sizes that are not powers of two, an expert map with remote
experts, grouped routing with and without a bias under both scorings, and large batches; the
W8A8 experts' cases mirror the experts' (int8 weights in [-127, 127], random float32 absmax per
output channel) and add a token of zeros; the weight-only int4 experts' cases mirror them too
(random 4-bit values, zero points and scales per group, 1 to 8 groups per expert).

Router logits are a random permutation per token of distinct multiples of 1/64 (exact in every
dtype), so no two experts tie and the chosen ids do not depend on the dtype or on the order of
float32 rounding.
"""

import torch

from vllm_kunlun.ops.check.case import TOLERANCE, Case, int_tensor, randn, wide_view
from vllm_kunlun.ops.quant.int4_layout import pack_int4


def distinct_logits(tokens: int, experts: int, dtype, device, g) -> torch.Tensor:
    ranks = torch.rand(tokens, experts, generator=g).argsort(dim=-1)
    return ((ranks - experts // 2) / 64.0).to(device=device, dtype=dtype)


def _softmax_topk(tokens: int, experts: int, top_k: int, renormalize: bool, strided=False):
    def make(dtype, device, g):
        logits = distinct_logits(tokens, experts + (7 if strided else 0), dtype, device, g)
        return (logits[:, 7:] if strided else logits), top_k, renormalize

    return make


def _grouped(tokens, experts, top_k, groups, topk_group, scoring, bias, renormalize=True,
             scale=1.0):  # fmt: skip
    def make(dtype, device, g):
        logits = distinct_logits(tokens, experts, dtype, device, g)
        correction = (torch.rand(experts, generator=g) * 0.1).to(device) if bias else None
        return logits, top_k, renormalize, groups, topk_group, scoring, correction, scale

    return make


def _routing(tokens: int, experts: int, top_k: int, g, idle: tuple[int, ...] = ()):
    """(weights float32 [T, k] summing to 1, distinct ids int32 [T, k]) avoiding `idle`."""
    allowed = torch.tensor([e for e in range(experts) if e not in idle])
    picks = torch.rand(tokens, allowed.numel(), generator=g).argsort(dim=-1)[:, :top_k]
    weights = torch.rand(tokens, top_k, generator=g) + 0.1
    return weights / weights.sum(dim=-1, keepdim=True), allowed[picks].to(torch.int32)


def _experts(tokens, experts, top_k, hidden, inter, activation="silu", idle=(), strided=False,
             expert_map=None, on_input=False, w8a8=False, zero_row=None,
             int4_groups=None):  # fmt: skip
    """expert_map: the local experts' global ids (the others are remote), or None. w8a8: the
    arguments of moe_experts_w8a8 (int8 weights and their float32 absmax); int4_groups: the
    arguments of moe_experts_wna16 with (G13, G2) groups; else moe_experts'. zero_row: a token
    whose hidden state is all zeros."""

    def make(dtype, device, g):
        global_experts = experts if expert_map is None else max(expert_map) + 2
        local = experts if expert_map is None else len(expert_map)
        if strided:
            x = wide_view(tokens, hidden, dtype, device, g)
        else:
            x = randn((tokens, hidden), dtype, device, g)
        if zero_row is not None:
            x[zero_row] = 0.0
        if w8a8:
            w13, w13_absmax = _int8_weight((local, 2 * inter, hidden), device, g)
            w2, w2_absmax = _int8_weight((local, hidden, inter), device, g)
        elif int4_groups is not None:
            w13_int4 = _int4_weight((local, hidden, 2 * inter), int4_groups[0], dtype, device, g)
            w2_int4 = _int4_weight((local, inter, hidden), int4_groups[1], dtype, device, g)
        else:
            w13 = randn((local, 2 * inter, hidden), dtype, device, g, hidden**-0.5)
            w2 = randn((local, hidden, inter), dtype, device, g, inter**-0.5)
        weights, ids = _routing(tokens, global_experts, top_k, g, idle)
        mapping = None
        if expert_map is not None:
            table = [-1] * global_experts
            for index, global_id in enumerate(expert_map):
                table[global_id] = index
            mapping = int_tensor(table, device)
        routing = (weights.to(device), ids.to(device), mapping, activation, on_input)
        if w8a8:
            return (x, w13, w13_absmax, w2, w2_absmax, *routing)
        if int4_groups is not None:
            return (x, *w13_int4, *w2_int4, *routing)
        return (x, w13, w2, *routing)

    return make


def _int8_weight(shape: tuple[int, int, int], device, g) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weights in [-127, 127], float32 absmax per expert and output channel [E, N]) whose
    dequantized rows have a standard deviation of about K^-0.5, like the float cases'."""
    experts, channels, depth = shape
    w = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
    absmax = (torch.rand(experts, channels, generator=g) + 0.5) * 2 * depth**-0.5
    return w.to(device), absmax.to(device)


def _int4_weight(shape: tuple[int, int, int], groups: int, dtype, device, g):
    """(packed int32 [E, K, N / 8], scales [E, G, N] in dtype, zeros int32 [E, G, N / 8]) with
    random 4-bit values and zero points, whose dequantized rows have a standard deviation of
    about K^-0.5 (|q - z| is about 6 on average)."""
    experts, depth, channels = shape
    q = torch.randint(0, 16, shape, generator=g)
    z = torch.randint(0, 16, (experts, groups, channels), generator=g)
    scales = (torch.rand(experts, groups, channels, generator=g) + 0.5) * depth**-0.5 / 6
    return pack_int4(q).to(device), scales.to(device=device, dtype=dtype), pack_int4(z).to(device)


#: moe_experts_wna16: the Kunlun binding dequantizes to fp16 (ops/moe/kunlun.py), so float32
#: cases get fp16's weight precision (up to 2^-11 relative per weight), in two GEMMs one after
#: the other: 3e-3 where the quant family's one-GEMM wNa16 cases allow 1e-3 (measured 1.4e-3).
INT4_TOLERANCE = {torch.float32: (1e-5, 3e-3)}


def _wna16(name: str, sizes: tuple[int, int, int, int, int], groups: tuple[int, int],
           big: bool = False, **options):  # fmt: skip
    """A moe_experts_wna16 case: sizes = (tokens, experts, top_k, hidden, inter)."""
    make = _experts(*sizes, int4_groups=groups, **options)
    return Case(name, make, big=big, tolerance=INT4_TOLERANCE)


#: moe_experts_w8a8: TOLERANCE plus 1e-2 x max |want| in rtol. The activation a is quantized
#: again inside the op, so an h or a that differs from the oracle's in the last bit (the kernel
#: rounds both to the case's dtype, the float64 oracle does not; a device computes them in
#: another order) may round a quantized value the other way at a near-tie, moving the output by
#: up to one step a_max * w2_absmax / 127, 0.3-0.8 % of max |want| in these cases: 1e-2 allows
#: about two. The random float16 cases need it: their rounding of h and a alone moves quotients
#: by up to 127 * 2^-11.
W8A8_TOLERANCE = {dtype: (atol, rtol + 1e-2) for dtype, (atol, rtol) in TOLERANCE.items()}


def _w8a8(name: str, sizes: tuple[int, int, int, int, int], big: bool = False, **options):
    """A moe_experts_w8a8 case: sizes = (tokens, experts, top_k, hidden, inter)."""
    make = _experts(*sizes, w8a8=True, **options)
    return Case(name, make, big=big, tolerance=W8A8_TOLERANCE)


CASES = {
    "moe_softmax_topk": [
        Case("1 token, 8 experts, top 2", _softmax_topk(1, 8, 2, True)),
        Case("3 tokens < 60 experts, top 4, raw", _softmax_topk(3, 60, 4, False)),
        Case("top_k = experts (6)", _softmax_topk(5, 6, 6, True)),
        Case("7 x 12 experts, top 3 (strided)", _softmax_topk(7, 12, 3, True, strided=True)),
        Case("4096 x 128 experts, top 8", _softmax_topk(4096, 128, 8, True), big=True),
    ],
    "moe_grouped_topk": [
        Case("1 token, sigmoid + bias", _grouped(1, 64, 8, 8, 4, "sigmoid", True, scale=2.5)),
        Case("DeepSeek-like 33 x 256/8", _grouped(33, 256, 8, 8, 4, "sigmoid", True)),
        Case("sigmoid, no bias, raw", _grouped(9, 48, 6, 6, 3, "sigmoid", False, False)),
        Case("softmax, no bias (V2)", _grouped(5, 60, 6, 10, 3, "softmax", False, scale=16.0)),
        Case("softmax + bias, 3 of 5 groups", _grouped(7, 40, 5, 5, 3, "softmax", True)),
        Case("top_k = kept experts", _grouped(4, 24, 8, 6, 2, "sigmoid", True)),
        Case(
            "2048 x 256/8, sigmoid + bias", _grouped(2048, 256, 8, 8, 4, "sigmoid", True), big=True
        ),  # fmt: skip
    ],
    "moe_experts": [
        Case("1 token, 4 experts, top 2", _experts(1, 4, 2, 64, 32)),
        Case("3 tokens < 16 experts", _experts(3, 16, 2, 64, 48)),
        Case("top_k = experts (4)", _experts(5, 4, 4, 32, 16)),
        Case("experts 1 and 6 idle", _experts(9, 8, 2, 64, 32, idle=(1, 6))),
        Case("strided hidden states", _experts(6, 8, 2, 64, 32, strided=True)),
        Case("6 experts, top 3, 72 x 40", _experts(7, 6, 3, 72, 40)),
        Case("expert map, 4 of 10 local", _experts(8, 4, 3, 64, 32, expert_map=[2, 3, 7, 8])),
        Case("gelu (erf)", _experts(5, 6, 2, 48, 24, activation="gelu")),
        Case("gelu_tanh", _experts(5, 6, 2, 48, 24, activation="gelu_tanh")),
        Case("router weight on input, top 1", _experts(6, 5, 1, 64, 32, on_input=True)),
        Case("512 tokens, 32 experts, top 4", _experts(512, 32, 4, 1024, 512), big=True),
    ],
    "moe_experts_w8a8": [
        _w8a8("1 token, 4 experts, top 2", (1, 4, 2, 64, 32)),
        _w8a8("3 tokens < 16 experts", (3, 16, 2, 64, 48)),
        _w8a8("top_k = experts (4)", (5, 4, 4, 32, 16)),
        _w8a8("experts 1 and 6 idle", (9, 8, 2, 64, 32), idle=(1, 6)),
        _w8a8("strided hidden states", (6, 8, 2, 64, 32), strided=True),
        _w8a8("6 experts, top 3, 72 x 40", (7, 6, 3, 72, 40)),
        _w8a8("expert map, 4 of 10 local", (8, 4, 3, 64, 32), expert_map=[2, 3, 7, 8]),
        _w8a8("gelu (erf)", (5, 6, 2, 48, 24), activation="gelu"),
        _w8a8("gelu_tanh", (5, 6, 2, 48, 24), activation="gelu_tanh"),
        _w8a8("router weight on input, top 1", (6, 5, 1, 64, 32), on_input=True),
        _w8a8("a token of zeros", (5, 6, 2, 64, 32), zero_row=2),
        _w8a8("512 tokens, 32 experts, top 4", (512, 32, 4, 1024, 512), big=True),
    ],
    "moe_experts_wna16": [
        _wna16("1 token, 4 experts, top 2", (1, 4, 2, 64, 32), (2, 1)),
        _wna16("3 tokens < 16 experts", (3, 16, 2, 64, 48), (1, 3)),
        _wna16("top_k = experts (4)", (5, 4, 4, 32, 16), (4, 2)),
        _wna16("experts 1 and 6 idle", (9, 8, 2, 64, 32), (8, 4), idle=(1, 6)),
        _wna16("strided hidden states", (6, 8, 2, 64, 32), (2, 2), strided=True),
        _wna16("6 experts, top 3, 72 x 40", (7, 6, 3, 72, 40), (3, 5)),
        _wna16("expert map, 4 of 10 local", (8, 4, 3, 64, 32), (2, 1), expert_map=[2, 3, 7, 8]),
        _wna16("gelu (erf)", (5, 6, 2, 48, 24), (3, 3), activation="gelu"),
        _wna16("router weight on input, top 1", (6, 5, 1, 64, 32), (2, 1), on_input=True),
        _wna16("a token of zeros", (5, 6, 2, 64, 32), (1, 1), zero_row=2),
        _wna16(
            "512 tokens, 32 experts, top 4, group 128", (512, 32, 4, 1024, 512), (8, 4), big=True
        ),  # fmt: skip
    ],
}
