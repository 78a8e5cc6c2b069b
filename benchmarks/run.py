"""`make bench`: the same workloads through the plugin and through vLLM's in-tree CPU backend.

    python -m benchmarks.run            # the full comparison (about an hour on 2 cores)
    python -m benchmarks.run --quick    # a very small end-to-end run (what the tests use)
    python -m benchmarks.run --only "64x128/128 eager"   # one offline workload

Each figure is the median of --runs runs per backend; the table shows plugin / in-tree ratios.
Results go to results/bench-<time>.json and .png with the machine, versions and settings.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.processes import child_env, run
from benchmarks.serving import ServingWorkload, run_serving
from vllm_kunlun.model_zoo.default_model import prepare_default_model
from vllm_kunlun.model_zoo.tiny import make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
VLLM_CLI = [sys.executable, "-m", "benchmarks.vllm_cli"]
KV_CACHE = "2G"  # the same KV-cache capacity for both backends

BACKENDS: dict[str, dict[str, str | None]] = {
    "plugin": {"VLLM_KUNLUN_EMULATE": "1", "VLLM_KUNLUN_EMULATED_MEMORY_GIB": "6"},
    "in-tree": {"VLLM_KUNLUN_EMULATE": None},
}


@dataclass
class OfflineWorkload:
    name: str
    model: str  # "default", or a random model of vllm_kunlun.model_zoo.tiny ("overhead", ...)
    num_prompts: int
    input_len: int
    output_len: int
    mode: str  # "eager" or "compile"
    dtype: str = "auto"


@dataclass
class Measurement:
    workload: str
    backend: str
    metrics: dict[str, float]
    runs: list[dict[str, float]] = field(default_factory=list)


def full_plan() -> tuple[list[OfflineWorkload], list[ServingWorkload]]:
    offline = []
    for mode in ("eager", "compile"):
        offline += [
            OfflineWorkload(f"throughput 64x128/128 {mode}", "default", 64, 128, 128, mode),
            OfflineWorkload(f"long prompts 16x1024/64 {mode}", "default", 16, 1024, 64, mode),
        ]
    offline.append(OfflineWorkload("host overhead 32x8/256 eager", "overhead", 32, 8, 256, "eager"))
    # A random 8-layer MoE whose experts dominate the time (vllm_kunlun.model_zoo.tiny).
    offline.append(OfflineWorkload("MoE 64x128/128 bf16 eager", "moe-bench", 64, 128, 128,
                                   "eager", dtype="bfloat16"))  # fmt: skip
    serving = [ServingWorkload(concurrency, 128, 64, max(8, 2 * concurrency))
               for concurrency in (1, 8, 32)]  # fmt: skip
    return offline, serving


def quick_plan() -> tuple[list[OfflineWorkload], list[ServingWorkload]]:
    return (
        [
            OfflineWorkload("host overhead 4x8/16 eager", "overhead", 4, 8, 16, "eager"),
            OfflineWorkload(
                "MoE 4x8/16 bf16 eager", "qwen3-moe", 4, 8, 16, "eager", dtype="bfloat16"
            ),
        ],
        [ServingWorkload(2, 16, 8, 4)],
    )


def model_path(kind: str, workdir: Path) -> Path:
    default = prepare_default_model()
    if kind == "default":
        return default
    target = workdir / f"tiny-{kind}"
    if not (target / "config.json").exists():
        make_tiny_checkpoint(kind, target, default)
    return target


def offline_command(workload: OfflineWorkload, model: Path, out: Path) -> list[str]:
    """`vllm bench throughput` for the workload, writing its JSON result to `out`."""
    command = [
        *VLLM_CLI, "bench", "throughput", "--model", str(model), "--dataset-name", "random",
        "--random-input-len", str(workload.input_len),
        "--random-output-len", str(workload.output_len),
        "--num-prompts", str(workload.num_prompts),
        "--max-model-len", str(workload.input_len + workload.output_len + 16),
        "--kv-cache-memory-bytes", KV_CACHE, "--output-json", str(out), "--seed", "0",
        "--dtype", workload.dtype,
    ]  # fmt: skip
    if workload.mode == "eager":
        command.append("--enforce-eager")
    return command


def run_offline(workload: OfflineWorkload, backend: str, model: Path, workdir: Path) -> dict:
    out = workdir / f"offline-{backend}-{time.monotonic_ns()}.json"
    command = offline_command(workload, model, out)
    finished = run(command, child_env(BACKENDS[backend]), timeout_s=3600)
    if finished.returncode != 0 or not out.exists():
        raise RuntimeError(f"{workload.name} on {backend} failed:\n{finished.output[-4000:]}")
    result = json.loads(out.read_text())
    output_tokens = workload.num_prompts * workload.output_len
    metrics = {
        "total tokens/s": result["tokens_per_second"],
        "output tokens/s": output_tokens / result["elapsed_time"],
        "peak RSS GiB": finished.peak_rss_bytes / (1 << 30),
    }
    if workload.model == "overhead":
        # Every step decodes all prompts at once: one step per output token.
        metrics["ms per decode step"] = 1000 * result["elapsed_time"] / workload.output_len
    return metrics


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def lower_is_better(metric: str) -> bool:
    """Latencies (ms) and memory (GiB); the ratio column is plugin / in-tree either way."""
    return bool({"ms", "GiB"} & set(metric.split()))


def render_table(measurements: list[Measurement]) -> str:
    by_workload: dict[str, dict[str, Measurement]] = {}
    for m in measurements:
        by_workload.setdefault(m.workload, {})[m.backend] = m
    lines = [f"{'workload':38} {'metric':22} {'plugin':>10} {'in-tree':>10} {'ratio':>7}"]
    for workload, sides in by_workload.items():
        for metric, plugin_value in sides["plugin"].metrics.items():
            in_tree = sides["in-tree"].metrics[metric]
            ratio = plugin_value / in_tree if in_tree else float("nan")
            better = "lower" if lower_is_better(metric) else "higher"
            lines.append(f"{workload:38} {metric:22} {plugin_value:10.2f} {in_tree:10.2f} "
                         f"{ratio:7.2f}  ({better} is better)")  # fmt: skip
    return "\n".join(lines)


def environment() -> dict[str, str]:
    import psutil
    import torch

    from vllm_kunlun import __version__
    from vllm_kunlun.compat import installed_vllm_version

    return {
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / (1 << 30):.1f} GiB",
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": installed_vllm_version() or "?",
        "vllm-kunlun": __version__,
        "settings": f"--kv-cache-memory-bytes {KV_CACHE}; plugin: emulated XPU with 6 GiB, "
        f"VLLM_KUNLUN_KERNELS={os.environ.get('VLLM_KUNLUN_KERNELS', 'auto')}",
    }


def write_results(measurements: list[Measurement], table: str, out_dir: Path) -> Path:
    from benchmarks.chart import draw_ratios

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / time.strftime("bench-%Y%m%d-%H%M%S")
    payload = {"environment": environment(), "table": table,
               "measurements": [asdict(m) for m in measurements]}  # fmt: skip
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    draw_ratios(measurements, stem.with_suffix(".png"))
    return stem


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a very small end-to-end run")
    parser.add_argument("--runs", type=int, default=None, help="runs per figure (median)")
    parser.add_argument("--out", type=Path, default=REPO / "results")
    parser.add_argument("--skip-serving", action="store_true")
    parser.add_argument("--only", metavar="TEXT", default=None,
                        help="only the offline workloads whose name contains TEXT "
                        "(e.g. 'eager'); implies --skip-serving")  # fmt: skip
    args = parser.parse_args(argv)
    runs = args.runs or (1 if args.quick else 3)
    offline, serving = quick_plan() if args.quick else full_plan()
    if args.only is not None:
        names = ", ".join(repr(w.name) for w in offline)
        offline = [w for w in offline if args.only in w.name]
        if not offline:
            parser.error(f"--only {args.only!r} matches no workload; the workloads are {names}")
    if args.skip_serving or args.only is not None:
        serving = []

    env_lines = "\n".join(f"  {k}: {v}" for k, v in environment().items())
    print(f"vllm-kunlun benchmark ({runs} run(s) per figure)\n{env_lines}", flush=True)
    measurements: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="vllm-kunlun-bench-") as tmp:
        workdir = Path(tmp)
        for workload in offline:
            model = model_path(workload.model, workdir)
            for backend in BACKENDS:
                samples = []
                for i in range(runs):
                    print(f"[bench] {workload.name} / {backend} run {i + 1}/{runs}", flush=True)
                    samples.append(run_offline(workload, backend, model, workdir))
                measurements.append(Measurement(workload.name, backend, median_of(samples),
                                                samples))  # fmt: skip
        if serving:
            model = model_path("overhead" if args.quick else "default", workdir)
            for backend in BACKENDS:
                print(f"[bench] serving / {backend}", flush=True)
                for name, samples in run_serving(
                    serving, backend, model, workdir, runs, VLLM_CLI, child_env(BACKENDS[backend])
                ).items():
                    measurements.append(Measurement(name, backend, median_of(samples), samples))

    table = render_table(measurements)
    print(table)
    stem = write_results(measurements, table, args.out)
    print(f"results: {stem}.json and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
