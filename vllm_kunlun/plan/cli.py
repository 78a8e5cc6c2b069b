"""`vllm-kunlun plan MODEL [vLLM flags]`: will the model fit, and how many requests at what context.

Exit status: 0 with a plan (fits or not), 1 with --strict when it does not fit, 2 when the input
cannot describe a deployment (one line on stderr naming the problem).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from vllm_kunlun.plan.devices import DEVICES, custom

USAGE_ERROR = 2
DOES_NOT_FIT = 1


def _count(text: str) -> int:
    """An integer as vLLM reads it (64M = 64 x 2^20, 64m = 64 x 10^6)."""
    from vllm.utils.argparse_utils import human_readable_int

    return human_readable_int(text)


def _length(text: str) -> int | None:
    """--max-model-len as vLLM reads it; "auto" plans the model's own maximum (the plan's
    longest context is what vLLM's auto-fit would choose)."""
    from vllm.utils.argparse_utils import human_readable_int_or_auto

    value = human_readable_int_or_auto(text)
    return None if value == -1 else value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vllm-kunlun plan",
        description="Plan a deployment before loading it: per-device weights, KV cache, the "
        "longest context and the concurrency that fit, from the model's config.json and "
        "safetensors headers only (vLLM's own model classes built on the meta device).",
    )
    p.add_argument("model", nargs="?", help="model folder (config.json, safetensors)")
    p.add_argument(
        "--config",
        type=Path,
        help="plan from a config.json alone (a file, or a folder holding one)",
    )
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--enable-expert-parallel", action="store_true")
    p.add_argument(
        "--max-model-len",
        type=_length,
        help="tokens per request (1k = 1000, 1K = 1024; default: the model's own)",
    )
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=_count)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", "-q")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        help="fraction of each device's memory the engine may use (vLLM's default)",
    )
    p.add_argument("--kv-cache-memory-bytes", type=_count)
    p.add_argument("--block-size", type=int)
    device = p.add_mutually_exclusive_group()
    device.add_argument(
        "--device",
        choices=sorted(DEVICES),
        default="p800",
        help="device to plan for (default p800; emulated: the emulated XPU, "
        "VLLM_KUNLUN_EMULATED_MEMORY_GIB each)",
    )
    device.add_argument(
        "--device-memory-gib", type=float, help="plan for devices with this much memory each"
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the plan as JSON")
    p.add_argument(
        "--strict", action="store_true", help="exit with status 1 when the deployment does not fit"
    )
    p.add_argument(
        "--no-suggestions",
        action="store_true",
        help="skip searching for changes that make it fit (faster)",
    )
    return p  # fmt: skip


def _model_folder(args: argparse.Namespace, scratch: Path) -> Path:
    if args.config is not None:
        config = args.config / "config.json" if args.config.is_dir() else args.config
        if not config.is_file():
            raise ValueError(f"--config {args.config}: no such config.json")
        shutil.copy(config, scratch / "config.json")
        return scratch
    if args.model is None:
        raise ValueError("name a model folder, or pass --config PATH/config.json")
    folder = Path(args.model)
    if not folder.is_dir():
        raise ValueError(f"{args.model}: no such folder (vllm-kunlun plan reads local folders; "
                         "for a model not on disk pass --config with its config.json)")  # fmt: skip
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: no config.json in this folder")
    return folder


def _check_sizes(args: argparse.Namespace) -> None:
    for flag in ("tensor_parallel_size", "pipeline_parallel_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.gpu_memory_utilization is not None and not 0 < args.gpu_memory_utilization <= 1:
        raise ValueError("--gpu-memory-utilization must be in (0, 1]")


def plan_request(args: argparse.Namespace, folder: Path):
    from vllm_kunlun.plan.planner import PlanRequest

    device = custom(args.device_memory_gib) if args.device_memory_gib else DEVICES[args.device]()
    return PlanRequest(
        model=folder, device=device,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, dtype=args.dtype,
        quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes, block_size=args.block_size,
    )  # fmt: skip


def render(plan, model_name: str) -> str:
    """The plan as a table for people."""
    from vllm_kunlun.plan.advice import NO_SUGGESTION
    from vllm_kunlun.plan.planner import human_bytes

    stages = range(plan.pipeline_parallel_size)
    budget_source = f"{plan.gpu_memory_utilization:g} x memory - weights - activations"
    if plan.kv_cache_memory_bytes is not None:
        budget_source = "--kv-cache-memory-bytes"
    rows = [
        ("weights", [human_bytes(w) for w in plan.weight_bytes],
         "vLLM's model classes built on the meta device"),
        ("activation reserve", [human_bytes(a) for a in plan.activation_bytes],
         "estimate (docs/plan.md), not a measurement"),
        ("KV cache budget", [human_bytes(b) for b in plan.kv_budget_bytes], budget_source),
        ("KV cache per token", [f"{b / 1024:,.1f} KiB" for b in plan.kv_bytes_per_token],
         "vLLM's KV-cache spec of the attention layers"),
    ]  # fmt: skip
    lines = [
        f"vllm-kunlun plan: {model_name} ({plan.architecture})",
        f"  device        {plan.device.name}: {human_bytes(plan.device.memory_bytes)} each "
        f"({plan.device.source})",
        f"  parallel      tensor {plan.tensor_parallel_size} x pipeline "
        f"{plan.pipeline_parallel_size} = "
        f"{plan.tensor_parallel_size * plan.pipeline_parallel_size} device(s)"
        + (", expert parallel" if plan.expert_parallel else ""),
        f"  precision     {plan.dtype}, quantization {plan.quantization or 'none'}, KV cache "
        f"dtype {plan.kv_cache_dtype}",
        f"  batch         --max-model-len {plan.max_model_len:,}  --max-num-seqs "
        f"{plan.max_num_seqs:,}  --max-num-batched-tokens {plan.max_num_batched_tokens:,}",
        "",
        "per device" + "".join(f"{'stage ' + str(s):>16}" for s in stages)
        if plan.pipeline_parallel_size > 1
        else "per device",
    ]
    for label, values, source in rows:
        lines.append(f"  {label:<20}" + "".join(f"{v:>14}" for v in values) + f"   {source}")
    kv = plan.kv
    lines += [
        f"  {'KV cache blocks':<20}{kv.blocks:>14,}   x {kv.block_size} tokens "
        f"({kv.bytes_per_block / (1 << 20):,.2f} MiB each)",
        f"  {'KV cache capacity':<20}{kv.tokens:>14,}   tokens",
        f"  {'longest context':<20}{kv.longest_context:>14,}   tokens, one request",
        f"  {'concurrency':<20}{kv.concurrency:>14,.1f}   requests of "
        f"{plan.max_model_len:,} tokens at once",
    ]
    if plan.checkpoint is not None:
        c = plan.checkpoint
        dtypes = ", ".join(f"{d} {human_bytes(b)}" for d, b in sorted(c.bytes_by_dtype.items()))
        lines.append(f"  checkpoint    {c.files} file(s), {c.tensors:,} tensors, "
                     f"{human_bytes(c.tensor_bytes)} ({dtypes})")  # fmt: skip
    if plan.kept_as_loaded:
        lines.append(f"  note          counted as loaded (their post-load step reads values): "
                     f"{', '.join(plan.kept_as_loaded)}")  # fmt: skip
    lines += ["", f"verdict: {plan.verdict}"]
    if plan.suggestions:
        lines.append("to make it fit, any one of:")
        lines += [f"  - {s}" for s in plan.suggestions]
    elif not plan.fits:
        lines.append(NO_SUGGESTION)
    return "\n".join(lines)


def _quiet_vllm() -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_KUNLUN_EMULATE", "1")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _quiet_vllm()
    with tempfile.TemporaryDirectory(prefix="vllm-kunlun-plan-") as scratch:
        try:
            _check_sizes(args)
            folder = _model_folder(args, Path(scratch))
            from vllm_kunlun.plan.planner import make_plan

            plan = make_plan(plan_request(args, folder), suggest=not args.no_suggestions)
        except ValueError as error:  # PlanInputError included
            sys.stderr.write(f"vllm-kunlun plan: {_one_line(error)}\n")
            return USAGE_ERROR
    name = args.model or f"{args.config} (config only)"
    if args.config is not None:
        plan.model = str(args.config)
    print(render(plan, name))
    if args.json is not None:
        args.json.write_text(json.dumps(plan.as_json(), indent=2, default=str) + "\n")
    return DOES_NOT_FIT if args.strict and not plan.fits else 0


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    # vLLM lists every supported architecture after an unknown one.
    return text.split(" Supported architectures:")[0][:400]
