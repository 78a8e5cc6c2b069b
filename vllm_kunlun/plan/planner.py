"""`make_plan`: the figures of one deployment, a verdict, and the smallest changes that fit."""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm_kunlun.plan.build import (
    PlanInputError,
    StageModel,
    build_stage,
    choose_kv_cache_layout,
    engine_config,
)
from vllm_kunlun.plan.checkpoint import CheckpointFacts, read_checkpoint
from vllm_kunlun.plan.devices import Device, batch_defaults
from vllm_kunlun.plan.figures import KvCapacity, activation_reserve, kv_capacity

if TYPE_CHECKING:
    from vllm.config import VllmConfig

GiB = 1 << 30
#: Largest deployment the "more devices" suggestion tries.
MAX_SUGGESTED_DEVICES = 64
#: Weight formats the suggestions offer for 16-bit models: (bits, `vllm-kunlun quantize`
#: scheme). Estimates: matmul weights shrink to bits/16; scales are left out.
QUANTIZED_FORMATS = ((8, "w8a8-dynamic"), (4, "w4a16"))


@dataclass(frozen=True)
class PlanRequest:
    """What the user plans: vLLM's flags of the same names."""

    model: Path
    device: Device
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enable_expert_parallel: bool = False
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    dtype: str = "auto"
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    #: None: vLLM's default.
    gpu_memory_utilization: float | None = None
    kv_cache_memory_bytes: int | None = None
    block_size: int | None = None

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def engine_kwargs(self) -> dict[str, Any]:
        tokens, seqs = batch_defaults(self.device, self.world_size)
        host = self.device.host_defaults  # vLLM picks the host defaults itself there
        optional = {"gpu_memory_utilization": self.gpu_memory_utilization}
        return {name: value for name, value in optional.items() if value is not None} | dict(
            model=str(self.model),
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            enable_expert_parallel=self.enable_expert_parallel,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs or (None if host else seqs),
            max_num_batched_tokens=self.max_num_batched_tokens or (None if host else tokens),
            dtype=self.dtype,
            quantization=self.quantization,
            kv_cache_dtype=self.kv_cache_dtype,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes,
            block_size=self.block_size,
        )


@dataclass
class Plan:
    model: str
    architecture: str
    device: Device
    tensor_parallel_size: int
    pipeline_parallel_size: int
    expert_parallel: bool
    dtype: str
    quantization: str | None
    kv_cache_dtype: str
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    gpu_memory_utilization: float
    kv_cache_memory_bytes: int | None
    #: Per pipeline stage (one device of it; tensor-parallel ranks hold the same).
    weight_bytes: list[int]
    activation_bytes: list[int]
    kv_budget_bytes: list[int]
    kv_bytes_per_token: list[int]
    kv: KvCapacity
    checkpoint: CheckpointFacts | None
    #: Post-load processing that needs weight values, so the plan counts those layers as loaded.
    kept_as_loaded: list[str] = field(default_factory=list)
    fits: bool = False
    verdict: str = ""
    suggestions: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["device"]["memory_gib"] = self.device.memory_bytes / GiB
        return data


def human_bytes(nbytes: float) -> str:
    if abs(nbytes) < GiB:
        return f"{nbytes / (1 << 20):.1f} MiB"
    return f"{nbytes / GiB:.2f} GiB"


def _kv_budget(request: PlanRequest, utilization: float, weights: int, activations: int) -> int:
    if request.kv_cache_memory_bytes is not None:
        return request.kv_cache_memory_bytes
    return int(request.device.memory_bytes * utilization) - weights - activations


def _kv_bytes_per_token(stage: StageModel) -> int:
    return sum(spec.page_size_bytes // spec.block_size for spec in stage.kv_cache_spec.values())


def _figures(request: PlanRequest) -> tuple[Plan, list[StageModel], "VllmConfig"]:
    vllm_config = engine_config(request.engine_kwargs())
    stages = [build_stage(vllm_config, rank) for rank in range(request.pipeline_parallel_size)]
    choose_kv_cache_layout(vllm_config, stages)
    activations = [activation_reserve(vllm_config, stage) for stage in stages]
    weights = [stage.weight_bytes for stage in stages]
    utilization = vllm_config.cache_config.gpu_memory_utilization
    budgets = [_kv_budget(request, utilization, w, a)
               for w, a in zip(weights, activations, strict=True)]  # fmt: skip
    model_config = vllm_config.model_config
    plan = Plan(
        model=str(request.model),
        architecture=model_config.architecture,
        device=request.device,
        tensor_parallel_size=request.tensor_parallel_size,
        pipeline_parallel_size=request.pipeline_parallel_size,
        expert_parallel=request.enable_expert_parallel,
        dtype=str(model_config.dtype).removeprefix("torch."),
        quantization=model_config.quantization,
        kv_cache_dtype=vllm_config.cache_config.cache_dtype,
        max_model_len=model_config.max_model_len,
        max_num_seqs=vllm_config.scheduler_config.max_num_seqs,
        max_num_batched_tokens=vllm_config.scheduler_config.max_num_batched_tokens,
        gpu_memory_utilization=utilization,
        kv_cache_memory_bytes=request.kv_cache_memory_bytes,
        weight_bytes=weights,
        activation_bytes=activations,
        kv_budget_bytes=budgets,
        kv_bytes_per_token=[_kv_bytes_per_token(stage) for stage in stages],
        kv=kv_capacity(vllm_config, stages, budgets),
        checkpoint=read_checkpoint(request.model),
        kept_as_loaded=sorted({name for stage in stages for name in stage.kept_as_loaded}),
    )
    plan.fits = plan.kv.blocks > 0 and plan.kv.longest_context >= plan.max_model_len
    plan.verdict = _verdict(plan)
    return plan, stages, vllm_config


def _verdict(plan: Plan) -> str:
    if plan.fits:
        return (f"fits: {plan.kv.concurrency:.1f} requests of {plan.max_model_len:,} tokens at "
                f"once (KV cache for {plan.kv.tokens:,} tokens per device)")  # fmt: skip
    worst = min(range(len(plan.kv_budget_bytes)), key=plan.kv_budget_bytes.__getitem__)
    if plan.kv_budget_bytes[worst] <= 0 or plan.kv.blocks == 0:
        usable = plan.device.memory_bytes * plan.gpu_memory_utilization
        weights, activations = plan.weight_bytes[worst], plan.activation_bytes[worst]
        return (f"does not fit: weights ({human_bytes(weights)}) and the activation reserve "
                f"({human_bytes(activations)}) leave no KV cache in "
                f"{plan.gpu_memory_utilization:g} x {human_bytes(plan.device.memory_bytes)} = "
                f"{human_bytes(usable)} per device")  # fmt: skip
    return (f"does not fit: one request of --max-model-len {plan.max_model_len:,} needs more KV "
            f"cache than the {human_bytes(min(plan.kv_budget_bytes))} left per device; the longest "
            f"that fits is {plan.kv.longest_context:,} tokens")  # fmt: skip


def _shorter_context(plan: Plan) -> str | None:
    longest = plan.kv.longest_context
    if plan.kv.blocks == 0 or longest < plan.kv.block_size:
        return None
    # A round figure for long contexts, the exact one for short ones.
    length = longest // 1024 * 1024 if longest >= 8192 else longest
    return f"shorter context: --max-model-len {length}"


def _quantized_formats(plan: Plan, stages: list[StageModel], request: PlanRequest,
                       vllm_config: "VllmConfig") -> list[str]:  # fmt: skip
    if plan.quantization is not None or plan.dtype not in ("bfloat16", "float16"):
        return []
    suggestions = []
    for bits, scheme in QUANTIZED_FORMATS:
        saved = [stage.matmul_weight_bytes * (16 - bits) // 16 for stage in stages]
        budgets = [b + s for b, s in zip(plan.kv_budget_bytes, saved, strict=True)]
        if request.kv_cache_memory_bytes is not None:
            budgets = plan.kv_budget_bytes
        kv = kv_capacity(vllm_config, stages, budgets)
        if kv.blocks and kv.longest_context >= plan.max_model_len:
            weights = max(w - s for w, s in zip(plan.weight_bytes, saved, strict=True))
            suggestions.append(
                f"{bits}-bit weights: about {human_bytes(weights)} of weights per device "
                f"(vllm-kunlun quantize SRC DST --scheme {scheme}; docs/quantization.md)"
            )
            break
    return suggestions


def _splits(factor: int) -> list[tuple[int, int]]:
    """Ways to spread `factor` times the devices: (tensor, pipeline) multipliers, powers of 2."""
    splits, tensor = [], factor
    while tensor >= 1:
        splits.append((tensor, factor // tensor))
        tensor //= 2
    return splits


def _deployment(plan: Plan) -> str:
    return (f"--tensor-parallel-size {plan.tensor_parallel_size} --pipeline-parallel-size "
            f"{plan.pipeline_parallel_size} ({plan.kv.concurrency:.1f} requests of "
            f"{plan.max_model_len:,} tokens at once)")  # fmt: skip


def _more_devices(request: PlanRequest) -> str | None:
    """The fewest devices that fit: the split with the most tensor parallelism (vLLM's usual
    first choice, lowest latency), and the split holding the most requests when that is another
    one (MLA's KV cache, for one, is not split by tensor parallelism)."""
    tp, pp = request.tensor_parallel_size, request.pipeline_parallel_size
    factor = 2
    while request.world_size * factor <= MAX_SUGGESTED_DEVICES:
        fitting = []
        for tensor, pipeline in _splits(factor):
            candidate = dataclasses.replace(request, tensor_parallel_size=tp * tensor,
                                            pipeline_parallel_size=pp * pipeline)  # fmt: skip
            try:
                plan = _figures(candidate)[0]
            except (PlanInputError, ValueError, AssertionError):
                continue  # this split is not possible for the model (heads, layers)
            if plan.fits:
                fitting.append(plan)
        if fitting:
            first, most = fitting[0], max(fitting, key=lambda plan: plan.kv.concurrency)
            text = f"more devices ({request.world_size * factor}): {_deployment(first)}"
            if most is not first:
                text += f"; most requests: {_deployment(most)}"
            return text
        factor *= 2
    return None


def make_plan(request: PlanRequest, suggest: bool = True) -> Plan:
    """The plan for `request`; with `suggest`, changes that make a plan that does not fit fit."""
    plan, stages, vllm_config = _figures(request)
    if plan.fits or not suggest:
        return plan
    context = _shorter_context(plan)
    if context:
        plan.suggestions.append(context)
    plan.suggestions += _quantized_formats(plan, stages, request, vllm_config)
    devices = _more_devices(request)
    if devices:
        plan.suggestions.append(devices)
    return plan
