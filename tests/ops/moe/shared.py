"""What the MoE family's tests share: plain per-token float64 formulas written independently of
the kernels (Python loops, Python sorting), and the inputs the tests build."""

import math
from dataclasses import dataclass

import torch

from tests.ops.quant.shared import plain_dequant, plain_pack, round_half_even

#: (atol, rtol) against max |expected|: GEMMs in the activation dtype round a few times.
EXPERT_TOLERANCE = {
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (1e-2, 2e-2),
    torch.float16: (2e-3, 4e-3),
}


def assert_within(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = EXPERT_TOLERANCE[dtype]
    assert got.shape == want.shape
    error = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    scale = want.double().abs().max().item() if want.numel() else 0.0
    assert error <= atol + rtol * scale, f"max error {error:.3g}, scale {scale:.3g}"


def distinct_logits(tokens: int, experts: int, dtype: torch.dtype) -> torch.Tensor:
    """Per token, a random order of distinct multiples of 1/64: exact in every dtype, no ties."""
    ranks = torch.rand(tokens, experts).argsort(dim=-1)
    return ((ranks - experts // 2) / 64.0).to(dtype)


def _top(scores: list[float], k: int) -> list[int]:
    """Indices of the k largest, largest first, ties to the lower index."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def plain_softmax_topk(logits: torch.Tensor, k: int, renormalize: bool):
    weights, ids = [], []
    for row in logits.double().tolist():
        top = max(row)
        exps = [math.exp(v - top) for v in row]
        probs = [e / sum(exps) for e in exps]
        chosen = _top(probs, k)
        w = [probs[i] for i in chosen]
        if renormalize:
            w = [v / sum(w) for v in w]
        weights.append(w)
        ids.append(chosen)
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(ids, dtype=torch.int32)


def plain_grouped_topk(logits, k, renormalize, groups, topk_group, scoring, bias, scale):
    weights, ids = [], []
    bias_values = None if bias is None else bias.double().tolist()
    for row in logits.double().tolist():
        if scoring == "softmax":
            top = max(row)
            exps = [math.exp(v - top) for v in row]
            scores = [e / sum(exps) for e in exps]
        else:
            scores = [1.0 / (1.0 + math.exp(-v)) for v in row]
        choice = (
            scores
            if bias_values is None
            else [s + b for s, b in zip(scores, bias_values, strict=True)]
        )
        size = len(row) // groups
        members = [choice[g * size : (g + 1) * size] for g in range(groups)]
        if bias_values is None:
            group_scores = [max(m) for m in members]
        else:
            group_scores = [sum(sorted(m, reverse=True)[:2]) for m in members]
        kept = set(_top(group_scores, topk_group))
        candidates = [c if e // size in kept else -math.inf for e, c in enumerate(choice)]
        chosen = _top(candidates, k)
        w = [scores[i] for i in chosen]
        if renormalize:
            w = [v / sum(w) for v in w]
        weights.append([v * scale for v in w])
        ids.append(chosen)
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(ids, dtype=torch.int32)


def _act(g: float, activation: str) -> float:
    if activation == "silu":
        return g / (1.0 + math.exp(-g))
    if activation == "gelu":
        return 0.5 * g * (1.0 + math.erf(g / math.sqrt(2.0)))
    inner = math.sqrt(2.0 / math.pi) * (g + 0.044715 * g**3)
    return 0.5 * g * (1.0 + math.tanh(inner))


def plain_moe_experts(x, w13, w2, topk_weights, topk_ids, expert_map, activation, on_input):
    """Token by token, slot by slot, in float64 (the slot's input rounded to x's dtype first
    when the router weight is applied on the input, as vLLM does)."""
    tokens, hidden = x.shape
    inter = w2.shape[2]
    out = torch.zeros(tokens, hidden, dtype=torch.float64)
    for t in range(tokens):
        for j in range(topk_ids.shape[1]):
            expert = int(topk_ids[t, j])
            if expert_map is not None:
                expert = int(expert_map[expert])
                if expert < 0:
                    continue
            weight = float(topk_weights[t, j])
            row = x[t]
            if on_input:
                row, weight = row * topk_weights[t, j].to(x.dtype), 1.0
            row = row.double()
            gate_up = w13[expert].double() @ row
            hidden_act = torch.tensor(
                [_act(float(gate_up[i]), activation) * float(gate_up[inter + i])
                 for i in range(inter)], dtype=torch.float64,
            )  # fmt: skip
            out[t] += weight * (w2[expert].double() @ hidden_act)
    return out


@dataclass(frozen=True)
class ExpertsShape:
    name: str
    tokens: int
    experts: int  # local experts
    top_k: int
    hidden: int
    inter: int
    idle: tuple[int, ...] = ()
    strided: bool = False
    local_ids: tuple[int, ...] | None = None  # global ids of the local experts (expert map)
    activation: str = "silu"
    on_input: bool = False
    zero_row: int | None = None  # a token whose hidden state is all zeros

    def __str__(self) -> str:
        return self.name


SHAPES = [
    ExpertsShape("1 token", 1, 4, 2, 64, 32),
    ExpertsShape("tokens < experts", 3, 16, 2, 64, 48),
    ExpertsShape("top_k = experts", 5, 4, 4, 32, 16),
    ExpertsShape("idle experts", 9, 8, 2, 64, 32, idle=(1, 6)),
    ExpertsShape("strided x", 6, 8, 2, 64, 32, strided=True),
    ExpertsShape("odd sizes", 7, 6, 3, 72, 40),
    ExpertsShape("expert map", 8, 4, 3, 64, 32, local_ids=(2, 3, 7, 8)),
    ExpertsShape("gelu", 5, 6, 2, 48, 24, activation="gelu"),
    ExpertsShape("gelu_tanh", 5, 6, 2, 48, 24, activation="gelu_tanh"),
    ExpertsShape("weight on input", 6, 5, 1, 64, 32, on_input=True),
]


def experts_inputs(shape: ExpertsShape, dtype: torch.dtype) -> tuple:
    """The op's arguments: x, w13, w2, weights fp32, ids int32 (global), expert_map, act, flag."""
    global_experts = shape.experts if shape.local_ids is None else max(shape.local_ids) + 2
    if shape.strided:
        x = torch.randn(shape.tokens, shape.hidden + 8).to(dtype)[:, 8:]
    else:
        x = torch.randn(shape.tokens, shape.hidden).to(dtype)
    if shape.zero_row is not None:
        x[shape.zero_row] = 0.0
    w13 = (torch.randn(shape.experts, 2 * shape.inter, shape.hidden) * shape.hidden**-0.5).to(dtype)
    w2 = (torch.randn(shape.experts, shape.hidden, shape.inter) * shape.inter**-0.5).to(dtype)
    allowed = torch.tensor([e for e in range(global_experts) if e not in shape.idle])
    picks = torch.rand(shape.tokens, allowed.numel()).argsort(dim=-1)[:, : shape.top_k]
    ids = allowed[picks].to(torch.int32)
    weights = torch.rand(shape.tokens, shape.top_k) + 0.1
    weights = weights / weights.sum(dim=-1, keepdim=True)
    expert_map = None
    if shape.local_ids is not None:
        expert_map = torch.full((global_experts,), -1, dtype=torch.int32)
        expert_map[list(shape.local_ids)] = torch.arange(len(shape.local_ids), dtype=torch.int32)
    return x, w13, w2, weights, ids, expert_map, shape.activation, shape.on_input


# W8A8 experts ----------------------------------------------------------------------------------

W8A8_SHAPES = [*SHAPES, ExpertsShape("a token of zeros", 5, 6, 2, 64, 32, zero_row=2)]


def int8_expert_weights(experts: int, channels: int, depth: int):
    """(int8 [E, N, K] in [-127, 127], float32 absmax [E, N]): dequantized rows of a standard
    deviation of about K^-0.5, like the float tests' weights."""
    w = torch.randint(-127, 128, (experts, channels, depth), dtype=torch.int8)
    return w, (torch.rand(experts, channels) + 0.5) * 2 * depth**-0.5


def experts_w8a8_inputs(shape: ExpertsShape, dtype: torch.dtype) -> tuple:
    """moe_experts_w8a8's arguments: x, w13, w13_absmax, w2, w2_absmax, then the routing."""
    x, _, _, *routing = experts_inputs(shape, dtype)
    w13, w13_absmax = int8_expert_weights(shape.experts, 2 * shape.inter, shape.hidden)
    w2, w2_absmax = int8_expert_weights(shape.experts, shape.hidden, shape.inter)
    return (x, w13, w13_absmax, w2, w2_absmax, *routing)


def _plain_quantize(values: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One token row per token: (q int64, absmax). The quotient values / (absmax / 127) is
    computed in float32, as the quant family specifies; the rounding is the test's own."""
    absmax = values.abs().max().float()
    if absmax == 0:
        return torch.zeros_like(values, dtype=torch.int64), 0.0
    quotient = values.float() / (absmax / 127)
    return round_half_even(quotient.double()).clamp(-127, 127).long(), float(absmax)


def plain_moe_experts_w8a8(x, w13, w13_absmax, w2, w2_absmax, topk_weights, topk_ids,
                           expert_map, activation, on_input):  # fmt: skip
    """Token by token, slot by slot, in float64: quantize the token row, exact integer dot
    products with w13[e], scale by x_max / 127 and w13_absmax / 127, round to x's dtype, the
    gated activation rounded to x's dtype, quantize it, the same with w2[e], and the weighted sum.

    -> (out float64 [T, H], step float64 [T, H]): step is sum_j |w_tj| * a_max * w2_absmax / 127,
    what one quantized activation value rounding the other way moves the output by at most (a
    kernel computing h or a in float32 may meet a near-tie the float64 formula rounds the other
    way; see assert_w8a8_within)."""
    tokens, hidden = x.shape
    inter = w2.shape[2]
    out = torch.zeros(tokens, hidden, dtype=torch.float64)
    step = torch.zeros(tokens, hidden, dtype=torch.float64)
    for t in range(tokens):
        for j in range(topk_ids.shape[1]):
            expert = int(topk_ids[t, j])
            if expert_map is not None:
                expert = int(expert_map[expert])
                if expert < 0:
                    continue
            weight = float(topk_weights[t, j])
            row = x[t]
            if on_input:
                row, weight = row * topk_weights[t, j].to(x.dtype), 1.0
            x_q, x_max = _plain_quantize(row.double())
            acc = w13[expert].long() @ x_q
            gate_up = acc.double() * (x_max / 127) * (w13_absmax[expert].double() / 127)
            gate_up = gate_up.to(x.dtype).double()
            a = torch.tensor(
                [_act(float(gate_up[i]), activation) * float(gate_up[inter + i])
                 for i in range(inter)], dtype=torch.float64,
            ).to(x.dtype).double()  # fmt: skip
            a_q, a_max = _plain_quantize(a)
            down = w2[expert].long() @ a_q
            y = down.double() * (a_max / 127) * (w2_absmax[expert].double() / 127)
            out[t] += weight * y.to(x.dtype).double()
            step[t] += abs(weight) * a_max * w2_absmax[expert].double() / 127
    return out, step


def assert_w8a8_within(got: torch.Tensor, want: torch.Tensor, step: torch.Tensor,
                       dtype: torch.dtype) -> None:  # fmt: skip
    """Within EXPERT_TOLERANCE of `want`, plus, element by element, one quantization step of
    the activation per slot (`step` from plain_moe_experts_w8a8), which a near-tie needs
    rarely: in at most one token of ten (at least one allowed)."""
    atol, rtol = EXPERT_TOLERANCE[dtype]
    assert got.shape == want.shape
    if not got.numel():
        return
    error = (got.double() - want.double()).abs()
    base = atol + rtol * want.double().abs().max()
    allowed = base + step
    worst = int((error - allowed).argmax())
    assert bool((error <= allowed).all()), (
        f"error {error.view(-1)[worst]:.3g} > allowed {allowed.view(-1)[worst]:.3g} "
        f"(step {step.view(-1)[worst]:.3g}) at {divmod(worst, got.shape[-1])}"
    )
    stepped = int((error > base).any(dim=-1).sum())
    assert stepped <= max(1, got.shape[0] // 10), f"{stepped} tokens needed the step"


# Weight-only int4 (wNa16) experts --------------------------------------------------------------


@dataclass(frozen=True)
class Int4ExpertsShape(ExpertsShape):
    groups: tuple[int, int] = (1, 1)  # (G13, G2): groups along H (w13's rows), along I (w2's)
    zero_points: str = "random"  # or "symmetric" (8)
    strided_weights: bool = False  # column slices of packed tensors twice as wide


WNA16_SHAPES = [
    Int4ExpertsShape("1 token, one group", 1, 4, 2, 64, 32),
    Int4ExpertsShape("tokens < experts", 3, 16, 2, 64, 48, groups=(2, 3)),
    Int4ExpertsShape("top_k = experts", 5, 4, 4, 32, 16, groups=(4, 2)),
    Int4ExpertsShape("idle experts, 8 and 4 groups", 9, 8, 2, 64, 32, idle=(1, 6), groups=(8, 4)),
    Int4ExpertsShape("strided x", 6, 8, 2, 64, 32, strided=True, groups=(2, 2)),
    Int4ExpertsShape("H 72, I 20", 7, 6, 3, 72, 20, groups=(3, 5)),
    Int4ExpertsShape("expert map", 8, 4, 3, 64, 32, local_ids=(2, 3, 7, 8), groups=(2, 1)),
    Int4ExpertsShape("gelu", 5, 6, 2, 48, 24, activation="gelu", groups=(3, 3)),
    Int4ExpertsShape("gelu_tanh", 5, 6, 2, 48, 24, activation="gelu_tanh", groups=(1, 2)),
    Int4ExpertsShape("weight on input", 6, 5, 1, 64, 32, on_input=True, groups=(2, 1)),
    Int4ExpertsShape("a token of zeros", 5, 6, 2, 64, 32, zero_row=2),
    Int4ExpertsShape(
        "symmetric, H 40, I 12", 4, 4, 2, 40, 12, groups=(5, 3), zero_points="symmetric"
    ),
    Int4ExpertsShape(
        "groups of one row, strided weights", 3, 3, 2, 16, 8, groups=(16, 8), strided_weights=True
    ),
]


def int4_expert_weights(experts: int, depth: int, channels: int, groups: int,
                        dtype: torch.dtype, zero_points: str = "random",
                        strided: bool = False):  # fmt: skip
    """(packed int32 [E, K, N / 8], scales [E, G, N] in dtype, zeros int32 [E, G, N / 8]), packed
    with the quant tests' plain packing: random 4-bit values, random (or symmetric, 8) zero
    points, dequantized entries of a standard deviation of about K^-0.5 (|q - z| is about 5.5 on
    average with random zero points), like the float tests' weights."""
    width = 2 * channels if strided else channels
    q = torch.randint(0, 16, (experts, depth, width))
    if zero_points == "symmetric":
        z = torch.full((experts, groups, width), 8)
    else:
        z = torch.randint(0, 16, (experts, groups, width))
    scales = ((torch.rand(experts, groups, width) + 0.5) * depth**-0.5 / 6).to(dtype)
    packed = plain_pack(q.reshape(-1, width)).view(experts, depth, width // 8)
    zeros = plain_pack(z.reshape(-1, width)).view(experts, groups, width // 8)
    if strided:
        words = channels // 8
        return packed[..., words:], scales[..., channels:], zeros[..., words:]
    return packed, scales, zeros


def experts_wna16_inputs(shape: Int4ExpertsShape, dtype: torch.dtype) -> tuple:
    """moe_experts_wna16's arguments: x, w13_packed, w13_scales, w13_zeros, w2_packed, w2_scales,
    w2_zeros, then the routing (weights fp32, ids int32, expert_map, activation, flag)."""
    x, _, _, *routing = experts_inputs(shape, dtype)
    options = {"zero_points": shape.zero_points, "strided": shape.strided_weights}
    groups13, groups2 = shape.groups
    w13 = int4_expert_weights(shape.experts, shape.hidden, 2 * shape.inter, groups13, dtype,
                              **options)  # fmt: skip
    w2 = int4_expert_weights(shape.experts, shape.inter, shape.hidden, groups2, dtype, **options)
    return (x, *w13, *w2, *routing)


def plain_dequantized_experts(packed, scales, zeros, dtype: torch.dtype) -> torch.Tensor:
    """float64 [E, K, N]: each expert's W = (q - z) * s by the quant tests' plain formula, rounded
    to dtype (as the op rounds W to x's dtype before its GEMM)."""
    return torch.stack([plain_dequant(packed[e], scales[e], zeros[e]).to(dtype).double()
                        for e in range(packed.shape[0])])  # fmt: skip


def plain_moe_experts_wna16(x, w13_packed, w13_scales, w13_zeros, w2_packed, w2_scales,
                            w2_zeros, topk_weights, topk_ids, expert_map, activation,
                            on_input):  # fmt: skip
    """Token by token, slot by slot, in float64: the expert's W13 [H, 2I] and W2 [I, H] from the
    plain int4 formula (tests/ops/quant/shared.py: unpacked nibble by nibble, (q - z) * s exact in
    float64) and rounded to x's dtype, as the op specifies (wna16_gemm rounds W to x's dtype
    before the GEMM); gate/up = x_t W13 rounded to x's dtype, the gated activation rounded to
    x's dtype, y = a W2 rounded to x's dtype (each GEMM rounds once), and the weighted sum."""
    tokens, hidden = x.shape
    inter = w2_packed.shape[1]
    weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def expert_weights(expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        if expert not in weights:
            # W rounded to x's dtype first: the op's GEMM runs on W in the activation dtype.
            w13 = plain_dequant(w13_packed[expert], w13_scales[expert], w13_zeros[expert])
            w2 = plain_dequant(w2_packed[expert], w2_scales[expert], w2_zeros[expert])
            weights[expert] = (w13.to(x.dtype).double(), w2.to(x.dtype).double())
        return weights[expert]

    out = torch.zeros(tokens, hidden, dtype=torch.float64)
    for t in range(tokens):
        for j in range(topk_ids.shape[1]):
            expert = int(topk_ids[t, j])
            if expert_map is not None:
                expert = int(expert_map[expert])
                if expert < 0:
                    continue
            weight = float(topk_weights[t, j])
            row = x[t]
            if on_input:
                row, weight = row * topk_weights[t, j].to(x.dtype), 1.0
            w13, w2 = expert_weights(expert)
            gate_up = (row.double() @ w13).to(x.dtype).double()  # [2I]: gate, then up
            a = torch.tensor(
                [_act(float(gate_up[i]), activation) * float(gate_up[inter + i])
                 for i in range(inter)], dtype=torch.float64,
            ).to(x.dtype).double()  # fmt: skip
            y = (a @ w2).to(x.dtype).double()
            out[t] += weight * y
    return out
