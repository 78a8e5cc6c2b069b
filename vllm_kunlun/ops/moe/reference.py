"""Reference MoE kernels: routing in float32, experts grouped by expert id.

Routing picks experts with a stable descending sort, so every row lists its experts from the
highest score down and ties go to the lower expert id; no host syncs.

`moe_experts` sorts the (token, slot) pairs by local expert id, runs each expert that received
tokens on its rows (gate_up GEMM, activation-and-mul, down GEMM, in the activation dtype, the
activation itself computed in float32 and rounded once), puts the weighted results back in
(token, slot) order and sums each token's slots in float32 (a gather and a sum: `index_add_`
on the host is an order of magnitude slower). Looping over the experts needs their token
counts on the host: that is one host sync per call (one `.tolist()`; the aten-level sync
counter does not see it), the only one in this family.

`moe_experts_w8a8` is the same grouping around a W8A8 expert MLP built from the quant family's
reference kernels: each row quantized per token, the int8 GEMMs scaled in float32 and rounded
to the activation dtype, the gated activation quantized again before the down GEMM.
`moe_experts_wna16` is the same grouping around the quant family's weight-only int4 GEMM: each
expert's two GEMMs dequantize that expert's packed weights (`wna16_gemm`).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vllm_kunlun.ops.quant import reference as quant

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": lambda g: F.gelu(g, approximate="none"),
    "gelu_tanh": lambda g: F.gelu(g, approximate="tanh"),
}


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """float32, or float64 as given (check-kernels' oracle runs the reference in float64)."""
    return t if t.dtype == torch.float64 else t.float()


def _descending(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest per row, largest first, ties to the lower index: (values, indices)."""
    values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def _result(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return weights.to(torch.float32).contiguous(), ids.to(torch.int32).contiguous()


def check_top_k(top_k: int, choosable: int) -> None:
    if not 0 < top_k <= choosable:
        raise ValueError(f"top_k={top_k} must be between 1 and {choosable} choosable experts")


def moe_softmax_topk(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """p = softmax(logits) over the experts; the top_k p per token, optionally / sum."""
    check_top_k(top_k, router_logits.shape[-1])
    probs = torch.softmax(_at_least_float32(router_logits), dim=-1)
    weights, ids = _descending(probs, top_k)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return _result(weights, ids)


def moe_grouped_topk(
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    num_expert_group: int,
    topk_group: int,
    scoring_func: str,
    e_score_correction_bias: torch.Tensor | None,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose by s + b among the topk_group best of num_expert_group groups; weigh by s."""
    tokens, experts = router_logits.shape
    if num_expert_group <= 0 or experts % num_expert_group:
        raise ValueError(f"{experts} experts do not split into {num_expert_group} equal groups")
    if not 0 < topk_group <= num_expert_group:
        raise ValueError(f"topk_group={topk_group} must be between 1 and {num_expert_group}")
    group_size = experts // num_expert_group
    check_top_k(top_k, topk_group * group_size)

    logits = _at_least_float32(router_logits)
    if scoring_func == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif scoring_func == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        raise ValueError(f"scoring_func must be 'softmax' or 'sigmoid', not {scoring_func!r}")

    if e_score_correction_bias is None:
        choice = scores
        groups = choice.view(tokens, num_expert_group, group_size)
        group_scores = groups.amax(dim=-1)
    else:
        choice = scores + e_score_correction_bias.to(scores.dtype)
        groups = choice.view(tokens, num_expert_group, group_size)
        group_scores = groups.topk(min(2, group_size), dim=-1).values.sum(dim=-1)

    _, best_groups = _descending(group_scores, topk_group)
    in_best_group = torch.zeros_like(group_scores, dtype=torch.bool)
    in_best_group.scatter_(1, best_groups, True)
    in_best_group = in_best_group.repeat_interleave(group_size, dim=1)  # [T, E]
    _, ids = _descending(choice.masked_fill(~in_best_group, float("-inf")), top_k)

    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return _result(weights * routed_scaling_factor, ids)


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {activation!r}")


def gated_activation(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up for gate_up = [gate | up], in float32 (at least), rounded once."""
    check_activation(activation)
    gate, up = _at_least_float32(gate_up).chunk(2, dim=-1)
    return (ACTIVATIONS[activation](gate) * up).to(gate_up.dtype)


#: One expert's gated MLP on its rows: (local expert index, rows [n, H]) -> [n, H].
ExpertMLP = Callable[[int, torch.Tensor], torch.Tensor]


def moe_experts(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None,
    activation: str,
    apply_router_weight_on_input: bool,
) -> torch.Tensor:
    """out[t] = sum_j w_tj * mlp_e(x_t), e = topk_ids[t, j] mapped to this rank's experts."""
    check_activation(activation)

    def expert_mlp(expert: int, rows: torch.Tensor) -> torch.Tensor:
        return gated_activation(rows @ w13[expert].t(), activation) @ w2[expert].t()

    return grouped_experts(hidden_states, w13.shape[0], expert_mlp, topk_weights, topk_ids,
                           expert_map, apply_router_weight_on_input)  # fmt: skip


#: The quant family's W8A8 GEMM: (x_q, x_absmax, w_q, w_absmax, x_zero_point, bias, out_dtype).
ScaledMM = Callable[..., torch.Tensor]


def w8a8_expert_mlp(
    w13: torch.Tensor,
    w13_absmax: torch.Tensor,
    w2: torch.Tensor,
    w2_absmax: torch.Tensor,
    activation: str,
    scaled_mm: ScaledMM = quant.int8_scaled_mm,
) -> ExpertMLP:
    """One expert's W8A8 gated MLP on its rows, with `scaled_mm` as the int8 GEMM."""

    def expert_mlp(expert: int, rows: torch.Tensor) -> torch.Tensor:
        x_q, x_max = quant.int8_quant_per_token(rows)
        gate_up = scaled_mm(x_q, x_max, w13[expert], w13_absmax[expert], None, None, rows.dtype)
        a_q, a_max = quant.int8_quant_per_token(gated_activation(gate_up, activation))
        return scaled_mm(a_q, a_max, w2[expert], w2_absmax[expert], None, None, rows.dtype)

    return expert_mlp


def moe_experts_w8a8(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w13_absmax: torch.Tensor,
    w2: torch.Tensor,
    w2_absmax: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None,
    activation: str,
    apply_router_weight_on_input: bool,
) -> torch.Tensor:
    """`moe_experts` with mlp_e(x) = W8A8(quant(act(W8A8(quant(x), w13[e]))), w2[e])."""
    check_activation(activation)
    expert_mlp = w8a8_expert_mlp(w13, w13_absmax, w2, w2_absmax, activation)
    return grouped_experts(hidden_states, w13.shape[0], expert_mlp, topk_weights, topk_ids,
                           expert_map, apply_router_weight_on_input)  # fmt: skip


#: The quant family's wNa16 GEMM: (x, w_packed, scales, zeros, input_order, bias).
Int4Gemm = Callable[..., torch.Tensor]


def check_wna16_experts(
    hidden_states: torch.Tensor,
    w13_packed: torch.Tensor,
    w13_scales: torch.Tensor,
    w13_zeros: torch.Tensor,
    w2_packed: torch.Tensor,
    w2_scales: torch.Tensor,
    w2_zeros: torch.Tensor,
) -> None:
    """The int4 experts' shapes against each other and x (shapes only: no host sync)."""
    experts, hidden = w13_packed.shape[0], hidden_states.shape[-1]
    for name, tensor in (("w13_packed", w13_packed), ("w13_scales", w13_scales),
                         ("w13_zeros", w13_zeros), ("w2_packed", w2_packed),
                         ("w2_scales", w2_scales), ("w2_zeros", w2_zeros)):  # fmt: skip
        if tensor.dim() != 3 or tensor.shape[0] != experts:
            raise ValueError(f"moe_experts_wna16: {name} must be [E = {experts}, ..], got "
                             f"{list(tensor.shape)}")  # fmt: skip
    if w13_packed.shape[1] != hidden or w2_scales.shape[2] != hidden:
        raise ValueError(
            f"moe_experts_wna16: x has H = {hidden} features, but w13_packed is "
            f"{list(w13_packed.shape)} ([E, H, 2I / 8]) and w2_scales {list(w2_scales.shape)} "
            "([E, G2, H])"
        )
    if w13_scales.shape[2] != 2 * w2_packed.shape[1]:
        raise ValueError(
            f"moe_experts_wna16: w13_scales {list(w13_scales.shape)} ([E, G13, 2I]) and "
            f"w2_packed {list(w2_packed.shape)} ([E, I, H / 8]) disagree on I"
        )
    if experts:
        quant.check_wna16_shapes(w13_packed[0], w13_scales[0], w13_zeros[0])
        quant.check_wna16_shapes(w2_packed[0], w2_scales[0], w2_zeros[0])


def wna16_expert_mlp(
    w13_packed: torch.Tensor,
    w13_scales: torch.Tensor,
    w13_zeros: torch.Tensor,
    w2_packed: torch.Tensor,
    w2_scales: torch.Tensor,
    w2_zeros: torch.Tensor,
    activation: str,
    gemm: Int4Gemm = quant.wna16_gemm,
) -> ExpertMLP:
    """One expert's weight-only int4 gated MLP on its rows, with `gemm` as the int4 GEMM."""

    def expert_mlp(expert: int, rows: torch.Tensor) -> torch.Tensor:
        gate_up = gemm(rows, w13_packed[expert], w13_scales[expert], w13_zeros[expert], None,
                       None)  # fmt: skip
        act = gated_activation(gate_up, activation)
        return gemm(act, w2_packed[expert], w2_scales[expert], w2_zeros[expert], None, None)

    return expert_mlp


def moe_experts_wna16(
    hidden_states: torch.Tensor,
    w13_packed: torch.Tensor,
    w13_scales: torch.Tensor,
    w13_zeros: torch.Tensor,
    w2_packed: torch.Tensor,
    w2_scales: torch.Tensor,
    w2_zeros: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None,
    activation: str,
    apply_router_weight_on_input: bool,
) -> torch.Tensor:
    """`moe_experts` with mlp_e(x) = wna16_gemm(act(wna16_gemm(x, W13_e)), W2_e)."""
    check_activation(activation)
    weights = (w13_packed, w13_scales, w13_zeros, w2_packed, w2_scales, w2_zeros)
    check_wna16_experts(hidden_states, *weights)
    expert_mlp = wna16_expert_mlp(*weights, activation)
    return grouped_experts(hidden_states, w13_packed.shape[0], expert_mlp, topk_weights,
                           topk_ids, expert_map, apply_router_weight_on_input)  # fmt: skip


def grouped_experts(
    hidden_states: torch.Tensor,
    local_experts: int,
    expert_mlp: ExpertMLP,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None,
    apply_router_weight_on_input: bool,
) -> torch.Tensor:
    """`moe_experts` around any per-expert MLP: pairs grouped by expert, each expert that got
    tokens run once on its rows, results weighted and summed back in token order."""
    tokens, top_k = topk_ids.shape
    x = hidden_states
    weights = _at_least_float32(topk_weights)
    if apply_router_weight_on_input:
        if top_k != 1:
            raise ValueError(f"apply_router_weight_on_input needs top_k == 1, not {top_k}")
        x = x * topk_weights.to(x.dtype)  # vLLM scales the input in the activation dtype
        weights = torch.ones_like(weights)

    ids = topk_ids.long()
    if expert_map is not None:
        ids = expert_map.long()[ids]  # -1: the expert lives on another rank

    # (token, slot) pairs in expert order; the remote ones (-1) sort first and are skipped.
    flat_ids = ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    per_expert = torch.zeros(local_experts + 1, dtype=torch.long, device=x.device)
    per_expert.index_add_(0, flat_ids + 1, torch.ones_like(flat_ids))
    remote, *counts = per_expert.tolist()  # the family's one host sync

    # Every pair's input row, grouped by expert (what Kunlun's moe_pre_sorted builds).
    sorted_x = x[order // top_k]
    outputs = [sorted_x.new_zeros(remote, x.shape[1])]  # remote pairs contribute zero
    start = remote
    for expert, count in enumerate(counts):
        if count:
            outputs.append(expert_mlp(expert, sorted_x[start : start + count]))
        start += count
    accumulate = torch.promote_types(x.dtype, torch.float32)
    weighted = torch.cat(outputs).to(accumulate) * weights.reshape(-1)[order, None]
    # Back to (token, slot) order (the inverse permutation), then summed over the slots.
    out = weighted[torch.argsort(order)].view(tokens, top_k, x.shape[1]).sum(dim=1)
    return out.to(x.dtype)
