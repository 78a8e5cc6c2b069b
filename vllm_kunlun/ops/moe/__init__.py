"""MoE family: routing tokens to experts, and the experts' gated MLPs.

Weight layout is vLLM's: w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I], for the
experts on this rank (E local experts); `expert_map` [E_global] maps a global expert id to its
local index, -1 when the expert lives on another rank. Routing runs in float32 and returns
(weights float32 [T, k], ids int32 [T, k]), contiguous, each row in descending order of the
score experts are chosen by (ties: the lower expert id first). The W8A8 experts take int8
weights in the same layout with their per-output-channel absmax (Kunlun's convention, see the
quant family: scale = absmax / 127). The weight-only int4 experts (wNa16) take each expert's
weights in the quant family's packed int4 layout (vllm_kunlun/ops/quant/int4_layout.py), input
dimension first: w13 int32 [E, H, 2I / 8] and w2 int32 [E, I, H / 8], with group scales
[E, G, N] and packed zero points [E, G, N / 8].

Declarations only: the kernels are in reference.py (the specification, also the emulated
device's kernel), compiled.py (the emulated device's fast experts) and kunlun.py (the Kunlun
binding).
"""

import torch

from vllm_kunlun.ops.declare import kernel_op


def _routing_fake(router_logits: torch.Tensor, top_k: int, *args, **kwargs):
    tokens = router_logits.shape[0]
    weights = router_logits.new_empty(tokens, top_k, dtype=torch.float32)
    return weights, router_logits.new_empty(tokens, top_k, dtype=torch.int32)


def _experts_fake(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return hidden_states.new_empty(hidden_states.shape)  # contiguous, whatever the input's strides


@kernel_op(fake=_routing_fake)
def moe_softmax_topk(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(router_logits [T, E]) in float32, the top_k experts per token and their weights,
    renormalized to sum to 1 when asked (vLLM's softmax top-k router, fused_topk).
    -> (weights float32 [T, k], ids int32 [T, k])."""


@kernel_op(fake=_routing_fake)
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
    """DeepSeek-V3 / GLM-4.5 routing (vLLM's grouped_topk): scores = softmax or sigmoid(logits)
    in float32; experts are chosen by scores + bias within the topk_group best of
    num_expert_group equal groups (a group scores as the sum of its top two when a bias is
    given, else as its best); weights are the unbiased scores of the chosen experts,
    renormalized when asked, times routed_scaling_factor. E must be a multiple of
    num_expert_group (vLLM routes other shapes with the plain top-k instead). Pass the
    router's factor: vLLM gives the router 1.0 and scales the MoE output instead when a model
    sets apply_routed_scale_to_output (DeepSeek-V2/V3, GLM-4 MoE).
    -> (weights float32 [T, k], ids int32 [T, k])."""


@kernel_op(fake=_experts_fake)
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
    """out[t] = sum_j w_tj * (act(x_t W_gate_e^T) * (x_t W_up_e^T)) W2_e^T over the top-k experts
    e = topk_ids[t, j] that live on this rank, as a new contiguous [T, H] tensor in x's dtype.
    hidden_states [T, H]; topk_weights float32 [T, k]; topk_ids int32 [T, k], global ids;
    expert_map int32 [E_global] (global -> local, -1: on another rank, the slot contributes
    nothing) or None (ids are local). activation: "silu", "gelu" (erf) or "gelu_tanh", vLLM's
    names. With apply_router_weight_on_input, x_t is scaled by w_tj (rounded to x's dtype)
    before the MLP instead of the output after it; top_k must then be 1."""


@kernel_op(fake=_experts_fake)
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
    """W8A8 int8 experts (compressed-tensors W8A8 MoE, Kunlun moe_fc with x/w_perchannel_max):
    as moe_experts, with each expert's MLP on its rows x [n, H]:
    x_q, x_max = int8_quant_per_token(x); h = int8 GEMM of x_q and w13[e] (int8 [2I, H]) scaled by
    x_max / 127 and w13_absmax[e] / 127 (float32 [2I]), rounded to x's dtype; a = act(gate) * up
    (gated_activation); a_q, a_max = int8_quant_per_token(a); y = the same GEMM with w2[e] (int8
    [H, I]) and w2_absmax[e] (float32 [H]), rounded to x's dtype. Routing weights, expert map,
    apply_router_weight_on_input and the combine are moe_experts'. w13_absmax [E, 2I] and
    w2_absmax [E, H] are the per-output-channel absmax (checkpoint scale x 127)."""


@kernel_op(fake=_experts_fake)
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
    """Weight-only int4 experts (compressed-tensors W4A16 MoE): as moe_experts, with each
    expert's MLP on its rows x [n, H]: h = wna16_gemm(x, w13_packed[e], w13_scales[e],
    w13_zeros[e]) (the quant family's GEMM: W = (q - z) * s rounded to x's dtype, accumulated in
    float32, rounded once), a = act(gate) * up (gated_activation), y = wna16_gemm(a,
    w2_packed[e], w2_scales[e], w2_zeros[e]). w13_packed int32 [E, H, 2I / 8]; w13_scales
    [E, G13, 2I] (any float dtype); w13_zeros int32 [E, G13, 2I / 8] (unsigned zero points, 8
    for symmetric formats); w2_packed int32 [E, I, H / 8]; w2_scales [E, G2, H]; w2_zeros int32
    [E, G2, H / 8]; H a multiple of G13 and I of G2 (refused otherwise). Routing weights, expert
    map, apply_router_weight_on_input and the combine are moe_experts'."""
