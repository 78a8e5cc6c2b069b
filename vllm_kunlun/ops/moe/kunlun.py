"""Kunlun binding of the MoE family (KUNLUN.md §2f). Needs a Kunlun XPU; contract-tested only,
against the stand-in library. Only `kunlun_ops` functions are bound: the `xspeedgate_ops`
small-batch paths the recorded plugin takes for M·k ≤ 768 (`moe_pre_small`,
`moe_active_expert_balance`, `fused_moe`) are another library and are not used; every batch
takes the recorded large-batch path.

Routing:
- moe_softmax_topk: `moe_softmax_topk_norm(x, normed_score, topk_index, block_statistic, stable)`
  when renormalize (that kernel always renormalizes, whatever the caller asked), else
  `moe_softmax_topk(x, normed_score, topk_index, block_statistic)` (no normalization, an empty
  int32 block_statistic). Logits are cast to float32 and the weights are float32 in both.
  `stable=True`, as the W8A8 path and v0.10 pass it; that it breaks ties towards the lower
  expert id like the reference is assumed.
- moe_grouped_topk: `moe_sigmoid_group_topk_norm` (keywords; `block_static` int32 [12, E]
  zeros; `scale` = routed_scaling_factor, applied after the normalization, as the W8A8 path
  uses it) only for sigmoid scoring with a correction bias and renormalize, E ≤ 512 and E a
  multiple of num_expert_group: the kernel always normalizes, and how it scores groups without
  a bias is not recorded. Every other grouped routing, softmax grouped routing included (no
  recorded kernel), runs the reference's PyTorch ops on the XPU.

Experts (`moe_experts`), the recorded large-batch path for every batch size:
`gen_block_statistic(topk_ids, block_statistic [12, E] zeros)`, then `moe_pre_sorted` (positional:
x, topk_index, block_statistic, moe_expand [M·k, H], moe_index [M·k], expert_m [E],
sorted_tokens_num_lod [E+1]), `moe_fc` with w13 into y [M, k, 2I] (keywords, `act` left None),
the activation, `moe_fc` with w2 into [M, k, H], and `moe_post` (positional: x, moe_index
viewed [M, k], normed_scale float32 [M, k], dequant_scale ones float32 [M, k], y [M, H]).

W8A8 experts (`moe_experts_w8a8`), the recorded compressed-tensors W8A8 MoE path (§2f) on the
same sort and combine: `quant2d` on moe_expand (through the quant family's binding:
`quant2d(x=, y=, max=, force_sdnn=True)` into x_q int8 [M·k, H] and x_max float32 [M·k, 1]),
`moe_fc(x=x_q, weight=w13 int8, sorted_tokens_num_lod=, sorted_tokens_idx=, moe_topk=, y=
[M, k, 2I] in the activation dtype, x_perchannel_max=x_max, w_perchannel_max=w13_absmax
float32 [E, 2I], topk_ids=the local ids int32 [M, k], act=None)`, the activation as above
(`swiglu` or PyTorch), a second `quant2d` on it viewed [M·k, I], the second `moe_fc` with w2
int8 and w2_absmax float32 [E, H] into [M, k, H], and `moe_post` with dequant_scale ones. The
weight absmaxes are the checkpoint scales × 127, as the recorded plugin multiplies them at load
(C4); the op takes them so.

Weight-only int4 experts (`moe_experts_wna16`): no recorded kunlun_ops kernel multiplies packed
int4 experts directly; the recorded W4A16 MoE path dequantizes the experts (`dequant_int4`,
whose scale x 15 and zero - 8 conventions KUNLUN.md records without their meaning) and runs the
float experts. Here the dequantization is the quant family's binding of `awq_dequantize`, whose
layout that family already assumes: all experts in one call, stacked along the input dimension
(w_packed viewed [E·K, N / 8], scales [E·G, N], zeros [E·G, N / 8], group_m = K / G, so row
e·K + k falls in group e·G + k // (K / G), that expert's own), giving fp16 [E·K, N], cast to the
activation dtype and transposed to moe_fc's [E, N, K]; then `moe_experts` above on those float
weights. Every call dequantizes every local expert: the cost of a large-batch path at any batch
size, and a float copy of the experts while the layer runs. The fp16 weight carries the quant
family's fp16 caveats (|W| < 65504; fp32 activations see fp16's 11 significant bits).

Every tensor handed over is contiguous (C1), index tensors are int32 (C5) and every output is
preallocated here (C2). "The other revision" below is baidu/vLLM-Kunlun `ops/_kunlun_ops.py` at
00db81a, a revision KUNLUN.md does not record; the facts taken from it are marked.

Assumptions (KUNLUN.md §4 and inferred behaviour):
- "12" rows of block_statistic is hard-coded as everywhere in the recorded plugin (§4.10);
  what it means and whether it depends on the SKU is unknown. XPU_USE_MOE_SORTED_THRES is not
  set or read here (§4.10).
- moe_pre_sorted is inferred to write the token rows sorted (stably) by expert id into
  moe_expand, moe_index[slot] = the slot's row there, expert_m = tokens per expert and the lod
  their running sum; moe_fc to compute row p of y from row p of x with the expert whose lod
  range holds p; moe_post to add up x[moe_index[t, j]] * normed_scale * dequant_scale per
  token. That moe_pre_sorted also serves batches the recorded plugin sends to
  `moe_pre_small` is assumed (the other revision does so for int4 MoE).
- The fused `moe_fc(act="SWISH_GLU")` the recorded plugin uses for M ≥ 1024 is not used: the
  other revision reports it wrong at those sizes. "silu" runs `swiglu` (silu on
  the first half, §4.4); "gelu" and "gelu_tanh" have no recorded kernel and run as PyTorch ops
  on the XPU between the two `moe_fc` calls.
- More than 512 experts: the other revision reports that moe_sigmoid_group_topk_norm and
  moe_pre_sorted fail above 512 experts; those shapes run the reference.
- expert_map (expert parallelism): the recorded kernels take local ids in [0, E) and know no
  remote experts (the recorded EP path is a PyTorch loop). Global ids are mapped to local ones
  here, remote slots are sent to local expert 0 with weight 0: they cost expert 0 some rows of
  work and contribute exactly 0 as long as that expert's output is finite.
- apply_router_weight_on_input scales x in PyTorch before the kernels; moe_post then gets
  weights of 1 (0 for remote slots).
- W8A8 moe_fc (inferred from the recorded call, which passes the per-token max of quant2d and
  vLLM's channel-wise weight scale [E, N, 1] × 127): with an int8 x and weight, x_perchannel_max
  is the absmax per row of the sorted x [M·k, 1] (row p of x, not token t), w_perchannel_max
  for the 3-D weight [E, N, K] is float32 [E, N] (one per expert and output channel; the same
  memory as vLLM's [E, N, 1]), and y row p = sum_k x_q[p, k] w[e, n, k] (exact) ×
  x_max[p] / 127 × w_max[e, n] / 127, rounded once to y's dtype, like the quant family's
  int8_scaled_mm. What moe_fc reads topk_ids for (with sort_mode=True, the default) is not
  recorded; the recorded call passes the routing's ids, so the local ids [M, k] the sort used
  are passed. quant2d's behaviour is the quant family binding's assumption.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm_kunlun.ops.kunlun_library import check_keywords, dense, function, library
from vllm_kunlun.ops.moe import reference
from vllm_kunlun.ops.quant import kunlun as quant_kunlun

#: Rows of every block_statistic tensor, as the recorded plugin hard-codes them (§4.10).
BLOCK_STATISTIC_ROWS = 12
#: Above this many experts the routing and pre-sort kernels fail (the other revision).
MAX_KERNEL_EXPERTS = 512
#: Kernels called positionally (only their presence can be checked).
POSITIONAL = ("moe_softmax_topk_norm", "moe_softmax_topk", "gen_block_statistic",
              "moe_pre_sorted", "moe_post")  # fmt: skip
KEYWORDS = {
    "moe_sigmoid_group_topk_norm": (
        "x", "norm_score", "topk_index", "block_static", "bias", "n_group", "topk_group", "scale",
    ),
    "moe_fc": ("x", "weight", "sorted_tokens_num_lod", "sorted_tokens_idx", "moe_topk", "y",
               "x_perchannel_max", "w_perchannel_max", "topk_ids", "act"),
    "swiglu": ("x", "y"),
}  # fmt: skip
#: moe_softmax_topk_norm's `stable` argument (see the module docstring).
STABLE_TOPK = True


def prepare() -> None:
    for name in POSITIONAL:
        function(name)
    check_keywords(KEYWORDS)


def _routing_outputs(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = logits.shape[0]
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=logits.device)
    return weights, torch.empty(tokens, top_k, dtype=torch.int32, device=logits.device)


def _block_statistic(experts: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(BLOCK_STATISTIC_ROWS, experts, dtype=torch.int32, device=device)


def moe_softmax_topk(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    reference.check_top_k(top_k, router_logits.shape[-1])
    logits = dense(router_logits.float())
    weights, ids = _routing_outputs(logits, top_k)
    if renormalize:
        library().moe_softmax_topk_norm(logits, weights, ids, None, STABLE_TOPK)
    else:
        no_statistic = torch.empty(0, dtype=torch.int32, device=logits.device)
        library().moe_softmax_topk(logits, weights, ids, no_statistic)
    return weights, ids


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
    experts = router_logits.shape[-1]
    kernel_covers = (
        scoring_func == "sigmoid"
        and e_score_correction_bias is not None
        and renormalize
        and experts <= MAX_KERNEL_EXPERTS
        and num_expert_group > 0
        and experts % num_expert_group == 0
        and 0 < topk_group <= num_expert_group
        and 0 < top_k <= topk_group * (experts // num_expert_group)
    )
    if not kernel_covers:
        return reference.moe_grouped_topk(
            router_logits, top_k, renormalize, num_expert_group, topk_group, scoring_func,
            e_score_correction_bias, routed_scaling_factor,
        )  # fmt: skip
    logits = dense(router_logits.float())
    weights, ids = _routing_outputs(logits, top_k)
    library().moe_sigmoid_group_topk_norm(
        x=logits,
        norm_score=weights,
        topk_index=ids,
        block_static=_block_statistic(experts, logits.device),
        bias=dense(e_score_correction_bias.float()),
        n_group=num_expert_group,
        topk_group=topk_group,
        scale=float(routed_scaling_factor),
    )
    return weights, ids


def _kernel_routing(
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None,
    apply_router_weight_on_input: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights float32, local ids int32) for the kernels: remote slots -> expert 0, weight 0."""
    weights = topk_weights.float()
    if apply_router_weight_on_input:
        weights = torch.ones_like(weights)  # already applied to x
    if expert_map is None:
        return dense(weights), dense(topk_ids.to(torch.int32))
    local = expert_map[topk_ids.long()]
    remote = local < 0
    ids = local.masked_fill(remote, 0).to(torch.int32)
    return dense(weights.masked_fill(remote, 0.0)), dense(ids)


@dataclass(frozen=True)
class _Sorted:
    """The (token, slot) rows sorted by expert (moe_pre_sorted's outputs), which both moe_fc
    calls and moe_post share."""

    rows: torch.Tensor  # moe_expand [M·k, H]
    index: torch.Tensor  # moe_index int32 [M·k]
    lod: torch.Tensor  # sorted_tokens_num_lod int32 [E+1]
    ids: torch.Tensor  # local expert ids int32 [M, k]
    tokens: int
    top_k: int

    def fc_keywords(self) -> dict:
        return {"sorted_tokens_num_lod": self.lod, "sorted_tokens_idx": self.index,
                "moe_topk": self.top_k}  # fmt: skip

    def new_output(self, width: int) -> torch.Tensor:
        """A moe_fc output y [M, k, width] in the activation dtype."""
        rows = self.rows
        return torch.empty(self.tokens, self.top_k, width, dtype=rows.dtype, device=rows.device)


def _activate(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up on moe_fc's [M, k, 2I]: `swiglu` for silu, PyTorch on the XPU otherwise."""
    if activation != "silu":  # no recorded kernel
        return reference.gated_activation(gate_up, activation)
    act = gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)
    library().swiglu(x=gate_up, y=act)
    return act


def _sorted_experts(
    hidden_states: torch.Tensor,
    experts: int,
    mlp: Callable[[_Sorted], torch.Tensor],
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None,
    activation: str,
    apply_router_weight_on_input: bool,
) -> torch.Tensor:
    """The recorded large-batch path around an expert MLP: gen_block_statistic and
    moe_pre_sorted, `mlp` (its moe_fc calls, -> [M, k, H]), then moe_post."""
    tokens, top_k = topk_ids.shape
    hidden = hidden_states.shape[1]
    reference.check_activation(activation)
    x = hidden_states
    if apply_router_weight_on_input:
        if top_k != 1:
            raise ValueError(f"apply_router_weight_on_input needs top_k == 1, not {top_k}")
        x = x * topk_weights.to(x.dtype)
    if tokens == 0:
        return x.new_zeros(0, hidden)
    x = dense(x)
    weights, ids = _kernel_routing(topk_weights, topk_ids, expert_map, apply_router_weight_on_input)
    device, dtype, slots = x.device, x.dtype, tokens * top_k

    block_statistic = _block_statistic(experts, device)
    library().gen_block_statistic(ids, block_statistic)
    moe_expand = torch.empty(slots, hidden, dtype=dtype, device=device)
    moe_index = torch.empty(slots, dtype=torch.int32, device=device)
    expert_m = torch.empty(experts, dtype=torch.int32, device=device)
    lod = torch.empty(experts + 1, dtype=torch.int32, device=device)
    library().moe_pre_sorted(x, ids, block_statistic, moe_expand, moe_index, expert_m, lod)

    expert_out = mlp(_Sorted(moe_expand, moe_index, lod, ids, tokens, top_k))
    out = torch.empty(tokens, hidden, dtype=dtype, device=device)
    dequant_scale = torch.ones(tokens, top_k, dtype=torch.float32, device=device)
    library().moe_post(expert_out, moe_index.view(tokens, top_k), weights, dequant_scale, out)
    return out


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
    experts, gate_up_size, hidden = w13.shape
    if experts > MAX_KERNEL_EXPERTS:
        return reference.moe_experts(
            hidden_states, w13, w2, topk_weights, topk_ids, expert_map, activation,
            apply_router_weight_on_input,
        )  # fmt: skip

    def mlp(s: _Sorted) -> torch.Tensor:
        gate_up = s.new_output(gate_up_size)
        library().moe_fc(x=s.rows, weight=dense(w13), y=gate_up, **s.fc_keywords())
        act = _activate(gate_up, activation)
        expert_out = s.new_output(hidden)
        library().moe_fc(x=act.view(-1, act.shape[-1]), weight=dense(w2), y=expert_out,
                         **s.fc_keywords())  # fmt: skip
        return expert_out

    return _sorted_experts(hidden_states, experts, mlp, topk_weights, topk_ids, expert_map,
                           activation, apply_router_weight_on_input)  # fmt: skip


def _channel_max(absmax: torch.Tensor, experts: int, channels: int) -> torch.Tensor:
    """A per-output-channel absmax as moe_fc's w_perchannel_max: float32 [E, N], contiguous."""
    return dense(absmax.float().reshape(experts, channels))


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
    experts, gate_up_size, hidden = w13.shape
    if experts > MAX_KERNEL_EXPERTS:
        return reference.moe_experts_w8a8(
            hidden_states, w13, w13_absmax, w2, w2_absmax, topk_weights, topk_ids, expert_map,
            activation, apply_router_weight_on_input,
        )  # fmt: skip

    def mlp(s: _Sorted) -> torch.Tensor:
        x_q, x_max = quant_kunlun.int8_quant_per_token(s.rows)  # quant2d
        gate_up = s.new_output(gate_up_size)
        library().moe_fc(x=x_q, weight=dense(w13), y=gate_up, **s.fc_keywords(),
                         x_perchannel_max=x_max,
                         w_perchannel_max=_channel_max(w13_absmax, experts, gate_up_size),
                         topk_ids=s.ids, act=None)  # fmt: skip
        act = _activate(gate_up, activation)
        a_q, a_max = quant_kunlun.int8_quant_per_token(act)  # quant2d on [M·k, I]
        expert_out = s.new_output(hidden)
        library().moe_fc(x=a_q, weight=dense(w2), y=expert_out, **s.fc_keywords(),
                         x_perchannel_max=a_max,
                         w_perchannel_max=_channel_max(w2_absmax, experts, hidden),
                         topk_ids=s.ids, act=None)  # fmt: skip
        return expert_out

    return _sorted_experts(hidden_states, experts, mlp, topk_weights, topk_ids, expert_map,
                           activation, apply_router_weight_on_input)  # fmt: skip


def _dequantized_experts(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Packed int4 experts [E, K, N / 8] as float [E, N, K] (moe_fc's layout) in dtype, from
    one awq_dequantize over the experts stacked along K (see the module docstring)."""
    experts, depth, words = packed.shape
    groups, channels = scales.shape[1], scales.shape[2]
    stacked = quant_kunlun.awq_weight_fp16(  # fp16, cast once to dtype below
        packed.reshape(experts * depth, words),
        scales.reshape(experts * groups, channels),
        zeros.reshape(experts * groups, words),
    )
    return dense(stacked.view(experts, depth, channels).transpose(1, 2).to(dtype))


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
    reference.check_activation(activation)
    reference.check_wna16_experts(hidden_states, w13_packed, w13_scales, w13_zeros, w2_packed,
                                  w2_scales, w2_zeros)  # fmt: skip
    if w13_packed.shape[0] > MAX_KERNEL_EXPERTS:
        return reference.moe_experts_wna16(
            hidden_states, w13_packed, w13_scales, w13_zeros, w2_packed, w2_scales, w2_zeros,
            topk_weights, topk_ids, expert_map, activation, apply_router_weight_on_input,
        )  # fmt: skip
    dtype = hidden_states.dtype
    w13 = _dequantized_experts(w13_packed, w13_scales, w13_zeros, dtype)
    w2 = _dequantized_experts(w2_packed, w2_scales, w2_zeros, dtype)
    return moe_experts(hidden_states, w13, w2, topk_weights, topk_ids, expert_map, activation,
                       apply_router_weight_on_input)  # fmt: skip
