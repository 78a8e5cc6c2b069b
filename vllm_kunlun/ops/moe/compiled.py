"""Emulated-device fast path for the MoE experts: bfloat16 expert GEMMs on weights that oneDNN
has reordered once, instead of on every call.

A decode step gives each expert a handful of tokens, and a bfloat16 GEMM that small spends much
of its time reordering the expert's weight into oneDNN's blocked layout. Here each expert
weight is reordered the first time the op sees it (torch's mkldnn packed linear, the one
inductor uses for frozen CPU weights) and the packed copy is kept: a second copy of the expert
weights in host memory. Grouping by expert, the activation and the weighted combine are the
reference's (`reference.grouped_experts`). Other dtypes, and hosts whose torch has no oneDNN
bfloat16, run the reference. Routing runs the reference: it is not where the time goes.

The W8A8 experts are the reference's expert MLP (`reference.w8a8_expert_mlp`) with the quant
family's fast int8 GEMM (torch._int_mm on the host, the reference elsewhere), which gives
bitwise the reference's GEMM: the result is bitwise the reference's. The weight-only int4
experts likewise use the quant family's fast int4 GEMM (byte-wise unpacking on the host,
bitwise the reference's).
"""

import functools
import weakref

import torch

from vllm_kunlun.ops.moe import reference
from vllm_kunlun.ops.quant import compiled as quant_compiled

#: Token count oneDNN picks the packed layout for: a decode step's tokens per expert.
PACKING_BATCH = 8

#: weight.data_ptr() -> (the weight, its version when packed, one packed matrix per expert).
_packed: dict[int, tuple[weakref.ref, int, list[torch.Tensor]]] = {}


@functools.cache
def packing_available() -> bool:
    """Whether torch has oneDNN's packed bf16 linear; asked once, as `takes` runs per call."""
    mkldnn = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(mkldnn, "_reorder_linear_weight")
        and hasattr(mkldnn, "_linear_pointwise")
        and bool(mkldnn._is_mkldnn_bf16_supported())
    )


def packed_experts(weight: torch.Tensor) -> list[torch.Tensor]:
    """`weight` [E, N, K] as E oneDNN-packed [N, K] matrices, packed once per weight version.

    Keyed by storage address and checked against a weak reference to the weight, so a weight
    updated in place (its version changes) or freed (another tensor may reuse the address) is
    packed afresh."""
    key = weight.data_ptr()
    cached = _packed.get(key)
    if cached is not None:
        owner, version, matrices = cached
        alive = owner()
        if alive is not None and alive.data_ptr() == key and alive._version == version:
            return matrices
    matrices = [
        torch.ops.mkldnn._reorder_linear_weight(weight[e].contiguous(), PACKING_BATCH)
        for e in range(weight.shape[0])
    ]
    owner = weakref.ref(weight, lambda dead: _forget(key, dead))
    _packed[key] = (owner, weight._version, matrices)
    return matrices


def _forget(key: int, owner: weakref.ref) -> None:
    """Drop the packed copy of a weight that no longer exists (not a newer one at its address)."""
    entry = _packed.get(key)
    if entry is not None and entry[0] is owner:
        del _packed[key]


def linear(rows: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """rows @ W.t() with W packed by `packed_experts`."""
    return torch.ops.mkldnn._linear_pointwise(rows.contiguous(), packed, None, "none", [], "")


def takes(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether the packed path runs these experts: bfloat16 on the host, oneDNN available."""
    tensors = (hidden_states, w13, w2)
    return (
        all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)
        and packing_available()
    )


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
    if not takes(hidden_states, w13, w2):
        return reference.moe_experts(
            hidden_states,
            w13,
            w2,
            topk_weights,
            topk_ids,
            expert_map,
            activation,
            apply_router_weight_on_input,
        )
    reference.check_activation(activation)
    gate_up_weights, down_weights = packed_experts(w13), packed_experts(w2)

    def expert_mlp(expert: int, rows: torch.Tensor) -> torch.Tensor:
        gate_up = linear(rows, gate_up_weights[expert])
        return linear(reference.gated_activation(gate_up, activation), down_weights[expert])

    return reference.grouped_experts(
        hidden_states,
        w13.shape[0],
        expert_mlp,
        topk_weights,
        topk_ids,
        expert_map,
        apply_router_weight_on_input,
    )


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
    reference.check_activation(activation)
    expert_mlp = reference.w8a8_expert_mlp(
        w13, w13_absmax, w2, w2_absmax, activation, quant_compiled.int8_scaled_mm
    )
    return reference.grouped_experts(
        hidden_states,
        w13.shape[0],
        expert_mlp,
        topk_weights,
        topk_ids,
        expert_map,
        apply_router_weight_on_input,
    )


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
    weights = (w13_packed, w13_scales, w13_zeros, w2_packed, w2_scales, w2_zeros)
    reference.check_wna16_experts(hidden_states, *weights)
    expert_mlp = reference.wna16_expert_mlp(*weights, activation, quant_compiled.wna16_gemm)
    return reference.grouped_experts(
        hidden_states,
        w13_packed.shape[0],
        expert_mlp,
        topk_weights,
        topk_ids,
        expert_map,
        apply_router_weight_on_input,
    )
