"""A deployment's memory per device: weights, activation reserve, KV cache, and what fits.

Weights come from the model built on the meta device (vllm_kunlun.plan.build). The KV-cache
arithmetic is vLLM's own (vllm.v1.core.kv_cache_utils: block counts, capacity, concurrency,
longest context), given the memory vLLM's worker would leave for it:

    KV budget = device memory x --gpu-memory-utilization - weights - activation reserve

(or --kv-cache-memory-bytes when given, as vLLM takes it). The activation reserve is an
ESTIMATE of the peak the engine's profiling run measures on a device, not a measurement:

    max_num_batched_tokens x (4 x hidden + 2 x widest projection) x activation bytes
    + max_num_seqs x vocabulary x 4 bytes x 2          (float32 logits and probabilities)

The widest projection is the widest linear output per token on one device (for MoE layers,
top-k x the experts' gate and up width). It leaves out the runtime's own memory (driver,
collectives), which on a P800 is not recorded; --gpu-memory-utilization keeps headroom for it.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vllm_kunlun.plan.build import StageModel

if TYPE_CHECKING:
    from vllm.config import VllmConfig


@dataclass(frozen=True)
class KvCapacity:
    blocks: int
    block_size: int
    #: Bytes of one block across the layers of the largest stage.
    bytes_per_block: int
    #: Tokens of KV capacity, as vLLM reports it ("KV cache size: N tokens").
    tokens: int
    #: The longest --max-model-len one request can use (capped at the model's own maximum).
    longest_context: int
    #: Requests of the planned --max-model-len the cache holds at once (vLLM's figure).
    concurrency: float


def activation_reserve(vllm_config: "VllmConfig", stage: StageModel) -> int:
    """The estimated peak activation bytes of one device of `stage` (module docstring)."""
    model_config = vllm_config.model_config
    scheduler = vllm_config.scheduler_config
    hidden = model_config.get_hidden_size()
    vocab = model_config.get_vocab_size()
    activation_bytes = model_config.dtype.itemsize
    per_token = (4 * hidden + 2 * stage.widest_projection) * activation_bytes
    sampler = scheduler.max_num_seqs * vocab * 4 * 2
    return scheduler.max_num_batched_tokens * per_token + sampler


def kv_capacity(vllm_config: "VllmConfig", stages: list[StageModel],
                kv_budgets: list[int]) -> KvCapacity:  # fmt: skip
    """vLLM's KV-cache plan for these stages with `kv_budgets` bytes on their devices."""
    from vllm.v1.core.kv_cache_utils import (
        estimate_max_model_len,
        get_kv_cache_capacity,
        get_kv_cache_configs,
    )

    model_config = vllm_config.model_config
    block_size = vllm_config.cache_config.block_size
    planned_length = model_config.max_model_len
    longest_possible = model_config.get_and_verify_max_len(None)
    empty = KvCapacity(0, block_size, 0, 0, 0, 0.0)
    if min(kv_budgets) <= 0:
        return empty
    specs = [stage.kv_cache_spec for stage in stages]
    try:
        # One token long, so that vLLM's "one request of max_model_len must fit" check does not
        # stop the count; the plan reports that check itself (longest_context).
        model_config.max_model_len = 1
        configs = get_kv_cache_configs(vllm_config, specs, kv_budgets)
    except ValueError:
        return empty
    finally:
        model_config.max_model_len = planned_length
    blocks = configs[0].num_blocks
    if blocks <= 0:
        return empty
    per_block = [sum(t.size for t in c.kv_cache_tensors) // c.num_blocks for c in configs]
    tokens, concurrency = get_kv_cache_capacity(vllm_config, configs[0])
    try:
        model_config.max_model_len = longest_possible
        # vLLM keeps one block back (the null block) before checking one request fits.
        longest = min(
            estimate_max_model_len(vllm_config, spec, budget - block_bytes)
            for spec, budget, block_bytes in zip(specs, kv_budgets, per_block, strict=True)
        )
    finally:
        model_config.max_model_len = planned_length
    return KvCapacity(blocks, block_size, max(per_block), tokens, longest, concurrency)
