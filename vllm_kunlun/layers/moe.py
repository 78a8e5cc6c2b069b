"""MoE experts through the plugin's moe ops: vLLM's unquantized MoE method, made monolithic.

vLLM 0.32 has no MoE CustomOp. A model's MoE block builds an `MoERunner`, which holds a router,
the gate and shared experts, and a `RoutedExperts` layer that owns the expert weights
(w13 [E, 2I, H]: gate rows then up rows; w2 [E, H, I]) and a quantization method that runs
them. For an unquantized checkpoint that method is `UnquantizedFusedMoEMethod`, a CustomOp, so
`CustomOp.register_oot` swaps in `KunlunUnquantizedFusedMoEMethod` on both Kunlun platforms.
(vLLM's method would pick no kernel there: its backend oracle answers OOT for an out-of-tree
platform.)

The plugin's method is **monolithic**: the runner hands it the router logits, and it routes with
the plugin's routing ops (`moe_softmax_topk`, or `moe_grouped_topk` for grouped, biased, sigmoid
or scaled routing) and runs the experts with `moe_experts`. vLLM's router is never called (on
a non-CPU platform its softmax top-k is a CUDA-only `_moe_C` op).

Routing and parallel features the ops do not implement are not guessed at: `create_weights`,
which sees the layer, records a `Refusal` (what is unsupported, what to use instead), and the
route report (vllm_kunlun.routes) refuses the layer at start-up with it.
"""

from dataclasses import dataclass

import torch
from vllm import envs as vllm_envs
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
    UnquantizedFusedMoEMethod,
)

from vllm_kunlun.ops import moe as moe_ops

#: Gated expert activations `moe_experts` computes (values of vLLM's MoEActivation).
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
#: Router score functions the routing ops compute.
SCORING_FUNCS = ("softmax", "sigmoid")

SUPPORTED_MOE = (
    "an MoE model with softmax or sigmoid top-k routing and bias-free gated silu/gelu experts "
    "(Qwen3-MoE, Mixtral, Qwen2-MoE, GLM-4.5, ERNIE-4.5; docs/support-matrix.md)"
)


@dataclass(frozen=True)
class Refusal:
    """Why the plugin cannot run an MoE layer, and what to use instead."""

    what: str
    instead: str


def refuse_eplb(moe: FusedMoEConfig) -> None:
    """Raised when the method is built: vLLM asks `supports_eplb` before weights exist."""
    if moe.moe_parallel_config.enable_eplb:
        raise ValueError(
            "vllm-kunlun does not support expert-parallel load balancing (--enable-eplb) "
            "yet: the plugin's MoE method routes inside its own op, where EPLB cannot "
            "count expert loads. Drop --enable-eplb."
        )


class KunlunMonolithicMoE:
    """What the plugin's MoE methods share: monolithic (the runner hands over the router logits),
    routing with the plugin's routing ops, and what the layer asks for that the ops cannot do
    recorded as a `Refusal` when the weights are created. Mixed in before vLLM's method class;
    a subclass names its experts op."""

    #: The plugin op that runs the experts.
    experts_op: str = "moe_experts"
    #: Set by `record_layer` (create_weights): what cannot run, and the routing. `groups` is None
    #: for plain softmax top-k, else the (num_expert_group, topk_group) of moe_grouped_topk.
    refusal: Refusal | None = None
    groups: tuple[int, int] | None = None

    @property
    def is_monolithic(self) -> bool:
        return True

    @property
    def supports_eplb(self) -> bool:
        return False

    def create_weights(self, layer, *args, **kwargs) -> None:
        """vLLM's method creates the weights; what the layer asks for is recorded."""
        super().create_weights(layer, *args, **kwargs)
        self.record_layer(layer)

    def record_layer(self, layer) -> None:
        self.refusal = refusal_for(layer, self.moe)
        self.groups = routing_groups(layer)

    @property
    def routing_op(self) -> str:
        return "moe_softmax_topk" if self.groups is None else "moe_grouped_topk"

    @property
    def ops_used(self) -> tuple[str, ...]:
        """The plugin ops this layer calls, for the route report."""
        return (self.routing_op, self.experts_op)

    def select_experts(
        self, layer, router_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights float32 [T, k], expert ids int32 [T, k]) from the router logits."""
        if self.refusal is not None:  # the route report refuses the model before this
            raise NotImplementedError(f"vllm-kunlun cannot run {self.refusal.what}")
        if self.groups is None:
            return moe_ops.moe_softmax_topk(router_logits, layer.top_k, layer.renormalize)
        num_expert_group, topk_group = self.groups
        return moe_ops.moe_grouped_topk(
            router_logits,
            layer.top_k,
            layer.renormalize,
            num_expert_group,
            topk_group,
            layer.scoring_func,
            layer.e_score_correction_bias,
            float(layer.routed_scaling_factor),
        )

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        raise NotImplementedError(
            f"{type(self).__name__} is monolithic: vLLM calls apply_monolithic"
        )


class KunlunUnquantizedFusedMoEMethod(KunlunMonolithicMoE, UnquantizedFusedMoEMethod):
    """Unquantized MoE experts: the plugin's routing op, then its experts op."""

    plugin_ops = ("moe_softmax_topk", "moe_grouped_topk", "moe_experts")

    def __init__(self, moe: FusedMoEConfig):
        refuse_eplb(moe)
        super().__init__(moe)  # on a Kunlun platform the oracle picks no vLLM kernel (OOT)

    def process_weights_after_loading(self, layer) -> None:
        """Nothing to convert: the moe ops read vLLM's weight layout as loaded.

        (vLLM's version would build a kernel of its own when weights arrive pre-processed.)
        """

    def apply_monolithic(
        self,
        layer,
        x: torch.Tensor,
        router_logits: torch.Tensor,
        input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        topk_weights, topk_ids = self.select_experts(layer, router_logits)
        return moe_ops.moe_experts(
            x,
            layer.w13_weight,
            layer.w2_weight,
            topk_weights,
            topk_ids,
            layer.expert_map,
            layer.activation.value,
            layer.apply_router_weight_on_input,
        )


def routing_groups(layer) -> tuple[int, int] | None:
    """How the layer's routing maps onto the routing ops: None for moe_softmax_topk (softmax,
    no bias, no scaling, not grouped), else (num_expert_group, topk_group) for
    moe_grouped_topk, one group holding every expert when the model does not group them."""
    if layer.use_grouped_topk and layer.num_expert_group and layer.topk_group:
        return (int(layer.num_expert_group), int(layer.topk_group))
    plain = (
        layer.scoring_func == "softmax"
        and layer.e_score_correction_bias is None
        and float(layer.routed_scaling_factor) == 1.0
    )
    return None if plain else (1, 1)


def refusal_for(layer, moe: FusedMoEConfig) -> Refusal | None:
    """Everything about this MoE layer the plugin's ops cannot run, if anything."""
    parallel = moe.moe_parallel_config
    activation = getattr(layer.activation, "value", str(layer.activation))
    custom = layer.custom_routing_function
    checks = [
        (
            custom is not None,
            "a custom MoE routing function "
            f"({getattr(custom, '__qualname__', type(custom).__name__)})",
            SUPPORTED_MOE,
        ),
        (
            layer.scoring_func not in SCORING_FUNCS,
            f"MoE router scoring function '{layer.scoring_func}' (the routing ops compute "
            "softmax and sigmoid)",
            SUPPORTED_MOE,
        ),
        (
            moe.has_hash_routing,
            "hash-routed MoE layers (experts chosen by token id)",
            SUPPORTED_MOE,
        ),
        (
            layer.use_grouped_topk
            and not (
                layer.num_expert_group
                and layer.topk_group
                and layer.global_num_experts % layer.num_expert_group == 0
            ),
            "grouped top-k routing without num_expert_group and topk_group, or with "
            f"{layer.global_num_experts} experts in {layer.num_expert_group} unequal groups",
            SUPPORTED_MOE,
        ),
        (
            moe.has_bias,
            "MoE experts with biases (w13_bias / w2_bias, GPT-OSS style)",
            SUPPORTED_MOE,
        ),
        (
            activation not in ACTIVATIONS,
            f"MoE expert activation '{activation}' (the experts op computes the gated "
            "silu, gelu and gelu_tanh MLPs)",
            SUPPORTED_MOE,
        ),
        (
            any(
                getattr(layer, name, None) is not None
                for name in ("swiglu_limit", "swiglu_alpha", "swiglu_beta")
            ),
            "clamped or scaled SwiGLU experts (swiglu_limit / swiglu_alpha / swiglu_beta)",
            SUPPORTED_MOE,
        ),
        (
            layer.apply_router_weight_on_input and layer.top_k != 1,
            f"router weights applied to the input with top-k {layer.top_k} (only top-1 is defined)",
            SUPPORTED_MOE,
        ),
        (
            layer.expert_map_manager.num_fused_shared_experts > 0,
            "shared experts fused into the routed experts (ROCm AITER)",
            "shared experts as their own MLP (vLLM's default off ROCm AITER)",
        ),
        (
            bool(vllm_envs.VLLM_MOE_ROUTING_SIMULATION_STRATEGY),
            "simulated MoE routing (VLLM_MOE_ROUTING_SIMULATION_STRATEGY)",
            "unset VLLM_MOE_ROUTING_SIMULATION_STRATEGY",
        ),
        (
            parallel.pcp_size > 1 or parallel.is_sequence_parallel,
            "MoE with prefill context parallelism or sequence-parallel MoE",
            "tensor, expert or data parallelism (--tensor-parallel-size, "
            "--enable-expert-parallel, --data-parallel-size)",
        ),
    ]
    found = [(what, instead) for unsupported, what, instead in checks if unsupported]
    if not found:
        return None
    insteads = dict.fromkeys(instead for _, instead in found)  # unique, in order
    return Refusal("; ".join(what for what, _ in found), "; or ".join(insteads))


def runner_refusal(runner) -> Refusal | None:
    """What about an MoE runner (vLLM's MoERunner) the plugin's method cannot honour: routers
    whose work is more than choosing experts, which a monolithic method never calls."""
    from vllm.model_executor.layers.fused_moe.router.zero_expert_router import ZeroExpertRouter

    if isinstance(getattr(runner, "router", None), ZeroExpertRouter):
        return Refusal(
            "MoE zero experts (identity experts added by the router, LongCat-Flash style)",
            SUPPORTED_MOE,
        )
    return None
