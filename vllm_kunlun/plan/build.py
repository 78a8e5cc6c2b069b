"""The model as vLLM would build it on each device, without devices or weights.

vLLM's own engine arguments make the configuration (the platform's checks included); vLLM's own
model class and quantization methods build each pipeline stage's layers on the meta device, as
rank 0 of that stage would hold them (vllm_kunlun.patches.planning_parallel_groups), and run the
post-load weight processing that changes what a device holds (MLA's absorbed matrices, repacked
quantized weights). The attention layers give vLLM's KV-cache spec.
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vllm_kunlun import envs
from vllm_kunlun.device.emulated import EmulatedRuntime
from vllm_kunlun.model_bytes import device_weight_bytes

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheSpec


class PlanInputError(ValueError):
    """The plan's input cannot describe a deployment (one line for the user)."""


@dataclass(frozen=True)
class StageModel:
    """What one device of a pipeline stage holds and needs per step."""

    pipeline_rank: int
    weight_bytes: int
    #: vLLM's KV-cache spec of each attention layer of the stage, by layer name.
    kv_cache_spec: dict[str, "KVCacheSpec"]
    #: Per token, the widest output of a projection (expert projections times top-k).
    widest_projection: int
    #: Bytes of weights in linear layers and experts (what a quantized format shrinks).
    matmul_weight_bytes: int
    #: Post-load processing steps that need weight values, so kept the loaded shapes.
    kept_as_loaded: list[str]


@contextlib.contextmanager
def _planning_environment(world_size: int) -> Iterator[None]:
    """Emulated devices enough for every rank, so vLLM's checks see a host that could hold the
    deployment; the plan only builds on the meta device."""
    if world_size > EmulatedRuntime.MAX_DEVICES:
        raise PlanInputError(
            f"{world_size} devices is more than vllm-kunlun plans for "
            f"({EmulatedRuntime.MAX_DEVICES}); lower --tensor-parallel-size or "
            "--pipeline-parallel-size."
        )
    with envs.overridden(
        {
            envs.VLLM_KUNLUN_EMULATED_DEVICES.name: str(world_size),
            envs.XPU_VISIBLE_DEVICES.name: None,
            "HF_HUB_OFFLINE": "1",
        }
    ):
        yield


def engine_config(engine_kwargs: dict[str, Any]) -> "VllmConfig":
    """vLLM's configuration for `vllm serve` with these engine arguments (EngineArgs fields)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    # Ray: the plan is for devices anywhere, so the one-host device count check does not apply.
    kwargs = {"skip_tokenizer_init": True, "distributed_executor_backend": "ray",
              **engine_kwargs}  # fmt: skip
    world_size = kwargs.get("tensor_parallel_size", 1) * kwargs.get("pipeline_parallel_size", 1)
    with _planning_environment(world_size):
        try:
            return EngineArgs(**kwargs).create_engine_config(UsageContext.OPENAI_API_SERVER)
        except PlanInputError:
            raise
        except Exception as error:  # vLLM's validation errors come in several types
            raise PlanInputError(_first_line(error)) from error


def _first_line(error: Exception) -> str:
    text = str(error)
    # pydantic wraps vLLM's message: "1 validation error for X\n  Value error, <message> [...]"
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Value error, "):
            return line.removeprefix("Value error, ").split(" [type=")[0]
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def _widest_projection(model: nn.Module) -> int:
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.model_executor.layers.linear import LinearBase

    widest = 0
    for module in model.modules():
        if isinstance(module, LinearBase):
            widest = max(widest, sum(getattr(module, "output_partition_sizes", [0])))
        elif isinstance(module, RoutedExperts):
            per_expert = 2 * module.intermediate_size_per_partition
            widest = max(widest, module.top_k * per_expert)
    return widest


def _matmul_weight_bytes(model: nn.Module) -> int:
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.model_executor.layers.linear import LinearBase

    total = 0
    for module in model.modules():
        if isinstance(module, (LinearBase, RoutedExperts)):
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False)
                         if p.dim() >= 2)  # fmt: skip
    return total


def _needs_values(error: Exception) -> bool:
    """Whether `error` is the meta device refusing an operation that reads tensor values."""
    return isinstance(error, (RuntimeError, NotImplementedError)) and "meta" in str(error)


def _process_after_loading(model: nn.Module, model_config) -> list[str]:
    """vLLM's post-load weight processing (model_loader.utils.process_weights_after_loading),
    layer by layer on the meta device. Steps that read weight values (a scale as a Python
    number, a range check while repacking) cannot run there: those layers keep the shapes they
    were loaded with, and the names of their methods are returned so the plan can say so."""
    from vllm.model_executor.layers.attention import is_deferred_attention_layer
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
    from vllm.model_executor.model_loader.weight_tying import maybe_retie_word_embeddings

    maybe_retie_word_embeddings(model, model_config)
    kept: set[str] = set()
    steps = [
        (
            module.quant_method.process_weights_after_loading,
            (module,),
            type(module.quant_method).__name__,
        )
        for module in model.modules()
        if isinstance(getattr(module, "quant_method", None), QuantizeMethodBase)
    ]
    steps += [(module.process_weights_after_loading, (model_config.dtype,), type(module).__name__)
              for module in model.modules() if is_deferred_attention_layer(module)]  # fmt: skip
    for step, args, name in steps:
        try:
            step(*args)
        except Exception as error:
            if not _needs_values(error):
                raise
            kept.add(name)
    if hasattr(model, "process_weights_after_loading"):
        model.process_weights_after_loading()
    return sorted(kept)


def build_stage(vllm_config: "VllmConfig", pipeline_rank: int) -> StageModel:
    """Pipeline stage `pipeline_rank`'s model on the meta device, as its rank-0 device holds it."""
    from vllm.config import get_layers_from_vllm_config, set_current_vllm_config
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    from vllm_kunlun.patches import planning_expert_map_log, planning_parallel_groups

    parallel = vllm_config.parallel_config
    config = vllm_config
    # Each stage registers its own attention layers there (the names repeat across builds).
    config.compilation_config.static_forward_context = {}
    groups = planning_parallel_groups(parallel.tensor_parallel_size,
                                      parallel.pipeline_parallel_size, pipeline_rank,
                                      parallel.data_parallel_size)  # fmt: skip
    model_config = config.model_config
    with groups, set_current_vllm_config(config), set_default_torch_dtype(model_config.dtype):
        with torch.device("meta"), planning_expert_map_log():
            model = initialize_model(vllm_config=config)
        kept_as_loaded = _process_after_loading(model, model_config)
        layers = get_layers_from_vllm_config(config, AttentionLayerBase)
        spec = {name: layer.get_kv_cache_spec(config) for name, layer in layers.items()}
    spec = {name: s for name, s in spec.items() if s is not None}
    return StageModel(
        pipeline_rank=pipeline_rank,
        weight_bytes=device_weight_bytes(model),
        kv_cache_spec=spec,
        widest_projection=_widest_projection(model),
        matmul_weight_bytes=_matmul_weight_bytes(model),
        kept_as_loaded=kept_as_loaded,
    )


def choose_kv_cache_layout(vllm_config: "VllmConfig", stages: list[StageModel]) -> None:
    """Settle the KV-cache layout as vLLM's engine core does before sizing the cache (the
    attention layers of the last stage built are the registered ones; all stages share one
    backend)."""
    from vllm.distributed.kv_transfer.kv_connector.utils import get_current_attn_backends
    from vllm.v1.attention.backends.utils import (
        get_supported_kv_cache_layouts,
        record_kv_cache_layout,
        resolve_kv_cache_layout,
    )

    backends = get_current_attn_backends(vllm_config)
    supported = [layout.name for layout in get_supported_kv_cache_layouts(backends)]
    specs = [spec for stage in stages for spec in stage.kv_cache_spec.values()]
    layout = resolve_kv_cache_layout(vllm_config, [supported] * len(stages), specs)
    record_kv_cache_layout(vllm_config.cache_config, layout.name)
