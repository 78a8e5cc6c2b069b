"""Build vLLM configs on the Kunlun XPU platform with a faked XPU runtime, in a fresh process.

vLLM resolves its platform once per process, so tests/test_platform_xpu.py runs this module in
a subprocess: `python -m tests.platform_xpu_probe MODEL_DIR`. It makes the plugin detect a
fake 8-XPU host (96 GiB each), then lets vLLM pick the platform through the plugin's entry
point and build real `VllmConfig`s, and prints one line `RESULT <json>` with what the platform
reported and decided. Nothing here touches torch.cuda: the calls the real runtime would make
are replaced by ones that fail loudly, and so is psutil's host-memory query.
"""

import json
import logging
import os
import sys
from typing import Any

GiB = 1 << 30
DEVICES = 8
HBM_BYTES = 96 * GiB
FREE_BYTES = 90 * GiB
ALLOCATED_BYTES = 3 * GiB


def _forbidden(what: str):
    def call(*args, **kwargs):
        raise AssertionError(f"{what} was called; the platform must ask the device runtime")

    return call


def install_fake_runtime() -> type:
    """Make vllm_kunlun.device detect a Kunlun host whose runtime is a fake, before vLLM runs."""
    import psutil
    import torch

    import vllm_kunlun.device as device
    from vllm_kunlun.device.xpu import XpuRuntime

    class FakeXpuRuntime(XpuRuntime):
        current_device: int | None = None

        def physical_device_count(self) -> int:
            return DEVICES

        def total_memory(self, index: int = 0) -> int:
            return HBM_BYTES

        def free_memory(self, index: int = 0) -> int:
            return FREE_BYTES

        def allocated_memory(self, device=None) -> int:
            return ALLOCATED_BYTES

        def set_device(self, index: int) -> None:
            self.current_device = index

        def synchronize(self) -> None:
            return None

    for name in ("get_device_properties", "mem_get_info", "set_device", "synchronize",
                 "reset_peak_memory_stats", "max_memory_allocated"):  # fmt: skip
        setattr(torch.cuda, name, _forbidden(f"torch.cuda.{name}"))
    psutil.virtual_memory = _forbidden("psutil.virtual_memory")
    device.runtime_present = lambda: True
    device.XpuRuntime = FakeXpuRuntime
    device.current_runtime.cache_clear()
    return FakeXpuRuntime


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def build(model: str, **engine_kwargs: Any) -> dict:
    """What the platform made of one engine configuration (with the warnings it logged), or
    the error that refused it."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_kunlun.log import get_logger

    recorder = _Recorder()
    platform_logger = get_logger("platform")
    platform_logger.addHandler(recorder)
    args = EngineArgs(model=model, skip_tokenizer_init=True, max_model_len=256, **engine_kwargs)
    try:
        config = args.create_engine_config()
    except Exception as error:  # the refusals are what some cases check
        return {"error": f"{type(error).__name__}: {error}"}
    finally:
        platform_logger.removeHandler(recorder)
    compilation = config.compilation_config
    pass_config = compilation.pass_config
    return {
        "device_type": config.device_config.device_type,
        "worker_cls": config.parallel_config.worker_cls,
        "block_size": config.cache_config.block_size,
        "compile_mode": compilation.mode.name,
        "backend": compilation.backend,
        "cudagraph_mode": compilation.cudagraph_mode.name,
        "capture_sizes": list(compilation.cudagraph_capture_sizes or []),
        "splitting_ops": list(compilation.splitting_ops or []),
        "custom_ops": list(compilation.custom_ops),
        "fusions_on": [f for f, on in vars(pass_config).items() if f.startswith("fuse_") and on],
        "async_scheduling": config.scheduler_config.async_scheduling,
        "warnings": recorder.messages,
    }


def platform_facts(platform, runtime_cls: type) -> dict:
    """The platform's answers that need no config, asked the way vLLM asks them."""
    import torch
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from vllm_kunlun.device import current_runtime

    def refusal(call) -> str:
        try:
            call()
        except Exception as error:
            return f"{type(error).__name__}: {error}"
        return "not refused"

    selector = AttentionSelectorConfig(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto",
                                       block_size=64)  # fmt: skip
    platform.set_device(torch.device("cuda:3"))
    platform.manual_seed_all(1234)
    first = torch.rand(2).tolist()
    torch.manual_seed(0)
    platform.manual_seed_all(1234)
    cls = type(platform)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "runtime_is_fake": isinstance(current_runtime(), runtime_cls),
        "device_type": platform.device_type,
        "device_name": platform.device_name,
        "dispatch_key": platform.dispatch_key,
        "dist_backend": platform.dist_backend,
        "ray_device_key": platform.ray_device_key,
        "device_control_env_var": platform.device_control_env_var,
        "simple_compile_backend": platform.simple_compile_backend,
        "is_cpu": platform.is_cpu(),
        "is_cuda": platform.is_cuda(),
        "is_cuda_alike": platform.is_cuda_alike(),
        "is_out_of_tree": platform.is_out_of_tree(),
        "is_sleep_mode_available": platform.is_sleep_mode_available(),
        "is_cumem_allocator_available": platform.is_cumem_allocator_available(),
        "support_static_graph_mode": platform.support_static_graph_mode(),
        "opaque_attention_op": platform.opaque_attention_op(),
        "static_graph_wrapper": platform.get_static_graph_wrapper_cls(),
        "device_name_reported": platform.get_device_name(0),
        "device_count": platform.device_count(),
        "total_memory": platform.get_device_total_memory(0),
        "free_memory": platform.get_device_free_memory(0),
        "current_memory_usage": platform.get_current_memory_usage(torch.device("cuda:0")),
        "set_device_reached_runtime": current_runtime().current_device == 3,
        "seeding_is_reproducible": torch.rand(2).tolist() == first,
        "communicator": platform.get_device_communicator_cls(),
        "attn_backend": platform.get_attn_backend_cls(None, selector),
        "mla_backend": platform.get_attn_backend_cls(None, selector._replace(use_mla=True)),
        "mla_prefill_backend": platform.get_mla_prefill_backend_cls(None).get_name(),
        "sparse_refusal": refusal(
            lambda: platform.get_attn_backend_cls(
                None, selector._replace(use_mla=True, use_sparse=True)
            )
        ),
        "quantization_refusal": refusal(lambda: platform.verify_quantization("fp8")),
        "punica_refusal": refusal(platform.get_punica_wrapper),
        "dtype_refusal": refusal(lambda: platform.check_if_supports_dtype(torch.float64)),
    }


CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "enforce_eager": {"enforce_eager": True},
    "full": {"compilation_config": {"cudagraph_mode": "FULL"}},
    "full_decode_only": {"compilation_config": {"cudagraph_mode": "FULL_DECODE_ONLY"}},
    "full_and_piecewise": {"compilation_config": {"cudagraph_mode": "FULL_AND_PIECEWISE"}},
    "no_compile_full": {"compilation_config": {"mode": 0, "cudagraph_mode": "FULL"}},
    "inductor": {"compilation_config": {"backend": "inductor"}},
    "custom_ops_none": {"compilation_config": {"custom_ops": ["none"]}},
    "empty_splitting_ops": {"compilation_config": {"splitting_ops": []}},
    "block_size_128": {"block_size": 128},
    "block_size_24": {"block_size": 24},
    "kv_cache_fp8": {"kv_cache_dtype": "fp8"},
    "lora": {"enable_lora": True},
    "quantization": {"quantization": "fp8"},
    "tp_16": {"tensor_parallel_size": 16, "distributed_executor_backend": "mp"},
    "pcp_2": {"prefill_context_parallel_size": 2},
}


def changed_variables(before: dict[str, str]) -> list[str]:
    return sorted(
        name for name in set(before) | set(os.environ) if before.get(name) != os.environ.get(name)
    )


def main() -> None:
    model = sys.argv[1]
    ld_preload = os.environ.get("LD_PRELOAD")
    runtime_cls = install_fake_runtime()
    from vllm.platforms import current_platform

    import vllm_kunlun

    result: dict[str, Any] = {"facts": platform_facts(current_platform, runtime_cls)}
    # Importing vLLM sets a few variables of its own; what matters is what the platform sets.
    before_configs = dict(os.environ)
    result["configs"] = {name: build(model, **kwargs) for name, kwargs in CASES.items()}
    result["env_changed_by_configs"] = changed_variables(before_configs)
    result["ld_preload_unchanged"] = os.environ.get("LD_PRELOAD") == ld_preload
    os.environ["XPU_VISIBLE_DEVICES"] = "0,3"
    result["visible_device_count"] = current_platform.device_count()
    del os.environ["XPU_VISIBLE_DEVICES"]
    vllm_kunlun.register_ops()
    result["ops_registered"] = vllm_kunlun._ops_registered
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
