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
"""

import torch

from vllm_kunlun.ops.kunlun_library import check_keywords, dense, function, library
from vllm_kunlun.ops.moe import reference

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
    "moe_fc": ("x", "weight", "sorted_tokens_num_lod", "sorted_tokens_idx", "moe_topk", "y"),
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
    tokens, top_k = topk_ids.shape
    experts, gate_up_size, hidden = w13.shape
    if experts > MAX_KERNEL_EXPERTS:
        return reference.moe_experts(
            hidden_states, w13, w2, topk_weights, topk_ids, expert_map, activation,
            apply_router_weight_on_input,
        )  # fmt: skip
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

    gate_up = torch.empty(tokens, top_k, gate_up_size, dtype=dtype, device=device)
    library().moe_fc(x=moe_expand, weight=dense(w13), sorted_tokens_num_lod=lod,
                     sorted_tokens_idx=moe_index, moe_topk=top_k, y=gate_up)  # fmt: skip
    if activation == "silu":
        act = torch.empty(tokens, top_k, gate_up_size // 2, dtype=dtype, device=device)
        library().swiglu(x=gate_up, y=act)
    else:  # no recorded kernel: PyTorch on the XPU
        act = reference.gated_activation(gate_up, activation)

    expert_out = torch.empty(tokens, top_k, hidden, dtype=dtype, device=device)
    library().moe_fc(x=act.view(slots, -1), weight=dense(w2), sorted_tokens_num_lod=lod,
                     sorted_tokens_idx=moe_index, moe_topk=top_k, y=expert_out)  # fmt: skip
    out = torch.empty(tokens, hidden, dtype=dtype, device=device)
    dequant_scale = torch.ones(tokens, top_k, dtype=torch.float32, device=device)
    library().moe_post(expert_out, moe_index.view(tokens, top_k), weights, dequant_scale, out)
    return out
