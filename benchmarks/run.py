"""`make bench`: the same workloads through the plugin and through vLLM's in-tree CPU backend.

    python -m benchmarks.run            # the full comparison (about an hour on 2 cores)
    python -m benchmarks.run --quick    # a very small end-to-end run (what the tests use)
    python -m benchmarks.run --only "64x128/128 eager"   # one offline workload
    python -m benchmarks.run --only W8A8                 # the W8A8 int8 rows

Each figure is the median of --runs runs per backend; the table shows plugin / in-tree ratios.
A workload with a quantization scheme runs the scheme's checkpoint of its model on both
backends, and the unquantized model through the plugin as well: a second table shows those
ratios (quantized / unquantized, both through the plugin), with the bytes of weights loaded.
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
from vllm_kunlun.model_zoo.quantized import quantized_checkpoint
from vllm_kunlun.model_zoo.tiny import make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
VLLM_CLI = [sys.executable, "-m", "benchmarks.vllm_cli"]
KV_CACHE = "2G"  # the same KV-cache capacity for both backends

BACKENDS: dict[str, dict[str, str | None]] = {
    "plugin": {"VLLM_KUNLUN_EMULATE": "1", "VLLM_KUNLUN_EMULATED_MEMORY_GIB": "6"},
    "in-tree": {"VLLM_KUNLUN_EMULATE": None},
}
#: The measurement of a quantized workload's unquantized model, run through the plugin.
UNQUANTIZED = "plugin, unquantized"
MiB = 1 << 20


@dataclass
class OfflineWorkload:
    name: str
    model: str  # "default", or a random model of vllm_kunlun.model_zoo.tiny ("overhead", ...)
    num_prompts: int
    input_len: int
    output_len: int
    mode: str  # "eager" or "compile"
    dtype: str = "auto"
    #: A scheme of vllm_kunlun.model_zoo.quantized ("w8a8-dynamic"): both backends run that
    #: checkpoint of the model, and the plugin runs the unquantized model too.
    scheme: str | None = None


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
    # The default model's W8A8 int8 checkpoint (int8 GEMMs: the plugin's quant ops, oneDNN
    # in-tree) against each other and against the bf16 model through the plugin.
    offline.append(OfflineWorkload("W8A8 throughput 64x128/128 int8 eager", "default", 64, 128,
                                   128, "eager", scheme="w8a8-dynamic"))  # fmt: skip
    # Its weight-only 4-bit checkpoint (compressed-tensors W4A16): the plugin's wna16_gemm,
    # vLLM's CPU wNa16 GEMM in-tree.
    offline.append(OfflineWorkload("W4A16 throughput 64x128/128 int4 eager", "default", 64, 128,
                                   128, "eager", scheme="w4a16"))  # fmt: skip
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


def model_path(kind: str, workdir: Path, scheme: str | None = None) -> Path:
    """The workload's model; with a scheme, that quantized checkpoint of it (made in workdir)."""
    default = prepare_default_model()
    if kind == "default":
        model = default
    else:
        model = workdir / f"tiny-{kind}"
        if not (model / "config.json").exists():
            make_tiny_checkpoint(kind, model, default)
    return model if scheme is None else quantized_checkpoint(model, scheme, workdir)


#: Tensor names of the token embedding and LM head, which quantized checkpoints keep unquantized.
EMBEDDING_NAMES = ("embed_tokens", "lm_head")


def checkpoint_weight_bytes(model: Path, embeddings: bool = True) -> int:
    """Bytes of the tensors in the model's safetensors files: the weights the loader reads (a
    tied embedding is stored once); without the embedding and LM head if `embeddings` is
    false. Each file is an 8-byte header length, the JSON header (every tensor's byte range),
    then the tensor data."""
    total = 0
    for path in model.glob("*.safetensors"):
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, entry in header.items():
            if name == "__metadata__" or (
                not embeddings and any(e in name for e in EMBEDDING_NAMES)
            ):
                continue
            start, stop = entry["data_offsets"]
            total += stop - start
    return total


def runs_of(workload: OfflineWorkload, workdir: Path) -> list[tuple[str, str, Path]]:
    """(measurement name, BACKENDS key, model) of each side of a workload."""
    model = model_path(workload.model, workdir, workload.scheme)
    sides = [(backend, backend, model) for backend in BACKENDS]
    if workload.scheme is not None:
        sides.append((UNQUANTIZED, "plugin", model_path(workload.model, workdir)))
    return sides


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
    if workload.scheme is not None:
        metrics["weights MiB"] = checkpoint_weight_bytes(model) / MiB
        metrics["non-embedding MiB"] = checkpoint_weight_bytes(model, embeddings=False) / MiB
    return metrics


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def lower_is_better(metric: str) -> bool:
    """Latencies (ms) and memory (GiB, MiB); the ratio column is plugin / in-tree either way."""
    return bool({"ms", "GiB", "MiB"} & set(metric.split()))


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
    baselines = [(w, sides) for w, sides in by_workload.items() if UNQUANTIZED in sides]
    if baselines:
        header = f"{'workload':38} {'metric':22} {'quantized':>10} {'unquant.':>10} {'ratio':>7}"
        lines += ["", "quantized / unquantized model, both through the plugin", header]
    for workload, sides in baselines:
        for metric, quantized in sides["plugin"].metrics.items():
            unquantized = sides[UNQUANTIZED].metrics[metric]
            ratio = quantized / unquantized if unquantized else float("nan")
            better = "lower" if lower_is_better(metric) else "higher"
            lines.append(f"{workload:38} {metric:22} {quantized:10.2f} {unquantized:10.2f} "
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
            for name, backend, model in runs_of(workload, workdir):
                samples = []
                for i in range(runs):
                    print(f"[bench] {workload.name} / {name} run {i + 1}/{runs}", flush=True)
                    samples.append(run_offline(workload, backend, model, workdir))
                measurements.append(Measurement(workload.name, name, median_of(samples),
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
