"""The plan's verdict for a `vllm-kunlun serve` that failed for memory, printed next to vLLM's
error by the supervisor (vllm_kunlun.supervisor)."""

import argparse
import os
from pathlib import Path

#: Lines of an engine start-up that failed for memory: the emulated worker's own error, and
#: vLLM's check that one request of --max-model-len fits the KV cache.
MEMORY_FAILURES = (
    "leaving no room for a KV cache",
    "larger than the available KV cache memory",
    "No available memory for the cache blocks",
)


NO_SUGGESTION = "no single change found that makes it fit within 64 devices"


def is_memory_failure(line: str) -> bool:
    return any(marker in line for marker in MEMORY_FAILURES)


def _serve_parser() -> argparse.ArgumentParser:
    from vllm_kunlun.plan.cli import parser

    p = parser()
    p.add_argument("--model", dest="model_flag")
    return p


def plan_argv_for_serve(serve_args: list[str]) -> list[str]:
    """`vllm-kunlun plan` arguments for the deployment `vllm-kunlun serve <serve_args>` asked
    for (its model and the flags the plan shares with vLLM; the others are not about memory)."""
    from vllm_kunlun.cli import build_argv
    from vllm_kunlun.device import EmulatedRuntime, detect

    args = build_argv(["serve", *serve_args])[1:]
    serve_parser = _serve_parser()
    known, _ = serve_parser.parse_known_args(args)
    model = known.model_flag or known.model
    argv = [model] if model else []
    for flag in ("tensor_parallel_size", "pipeline_parallel_size", "max_model_len",
                 "max_num_seqs", "max_num_batched_tokens", "dtype", "quantization",
                 "kv_cache_dtype", "gpu_memory_utilization", "kv_cache_memory_bytes",
                 "block_size"):  # fmt: skip
        value = getattr(known, flag)
        if value is not None and value != serve_parser.get_default(flag):
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    if known.enable_expert_parallel:
        argv.append("--enable-expert-parallel")
    device = "emulated" if isinstance(detect(), EmulatedRuntime) else "p800"
    return [*argv, "--device", device]


def advice_for_serve(serve_args: list[str]) -> str:
    """The plan's verdict and suggestions for `serve_args`, as lines for the user."""
    from vllm_kunlun.plan.cli import parser, plan_request
    from vllm_kunlun.plan.planner import make_plan

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    argv = plan_argv_for_serve(serve_args)
    args = parser().parse_args(argv)
    try:
        plan = make_plan(plan_request(args, Path(args.model)))
    except ValueError as error:
        return f"vllm-kunlun plan could not plan this deployment: {error}\n"
    lines = [f"vllm-kunlun plan ({' '.join(['vllm-kunlun', 'plan', *argv])}):",
             f"  verdict: {plan.verdict}"]  # fmt: skip
    if plan.suggestions:
        lines.append("  to make it fit, any one of:")
        lines += [f"    - {s}" for s in plan.suggestions]
    elif not plan.fits:
        lines.append(f"  {NO_SUGGESTION}")
    return "\n".join(lines) + "\n"
