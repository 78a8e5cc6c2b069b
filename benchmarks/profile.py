"""`make profile`: where the time goes, through the plugin and through vLLM's in-tree CPU backend.

    python -m benchmarks.profile                       # 64x128/128 eager, both backends
    python -m benchmarks.profile --only "host overhead"  # another offline workload
    python -m benchmarks.profile --keep DIR            # keep py-spy's raw stacks in DIR

Runs one offline workload of `make bench` once per backend under py-spy (a sampling profiler
that follows vLLM's engine and worker processes), then prints, per backend, the time the model
runner spent in each part of a step (attention, GEMMs, norms, ...) and the functions it spent it in.
Sampling slows both sides alike, so compare the columns with each other, not with `make bench`.
"""

import argparse
import re
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

from benchmarks.processes import child_env, run
from benchmarks.run import BACKENDS, full_plan, model_path, offline_command

RATE_HZ = 50
#: Frames whose samples make up the model runner's time (the denominator).
RUNNER_FRAMES = ("GPUModelRunner.execute_model", "GPUModelRunner.sample_tokens")
#: Parts of a step, each named by the frames (function names) that enter it on either backend.
PARTS: dict[str, tuple[str, ...]] = {
    "attention": ("KunlunAttentionImpl.forward", "CPUAttentionBackendImpl.forward"),
    "  of which decode": ("decode_attention",),
    "  of which prefill": ("prefill_attention",),
    "KV-cache writes": (
        "KunlunAttentionImpl.do_kv_cache_update",
        "CPUAttentionBackendImpl.do_kv_cache_update",
    ),
    "GEMMs (linear layers, LM head)": ("cpu_unquantized_gemm",),
    "RMSNorm": ("rms_norm", "fused_add_rms_norm"),
    "rotary embedding": ("KunlunRotaryEmbedding.forward_oot", "RotaryEmbedding.forward_cpu"),
    "SiLU and mul": ("KunlunSiluAndMul.forward_oot", "SiluAndMul.forward_cpu"),
    "sampling": ("GPUModelRunner.sample_tokens",),
}
_LINE_NUMBER = re.compile(r" \((.*?):\d+\)$")


def read_stacks(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's raw (collapsed) output -> [(frames outermost first, samples)], without line
    numbers, so that one function is one frame."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_LINE_NUMBER.sub(r" (\1)", frame) for frame in stack.split(";")]
        stacks.append((frames, int(count)))
    return stacks


def function_name(frame: str) -> str:
    return frame.split(" (", 1)[0]


def runner_stacks(stacks: list[tuple[list[str], int]]) -> list[tuple[list[str], int]]:
    """The samples taken inside the model runner, each cut to start at the runner's frame."""
    kept = []
    for frames, count in stacks:
        names = [function_name(frame) for frame in frames]
        starts = [i for i, name in enumerate(names) if name in RUNNER_FRAMES]
        if starts:
            kept.append((frames[starts[0] :], count))
    return kept


def part_samples(stacks: list[tuple[list[str], int]]) -> dict[str, int]:
    """Samples per part of PARTS; a sample counts once for a part, however deep it recurses."""
    totals = dict.fromkeys(PARTS, 0)
    for frames, count in stacks:
        names = {function_name(frame) for frame in frames}
        for part, entries in PARTS.items():
            if names.intersection(entries):
                totals[part] += count
    return totals


def heaviest_frames(stacks: list[tuple[list[str], int]], top: int) -> list[tuple[str, int]]:
    """Innermost Python frames by samples: where the time is spent, native calls included
    (py-spy charges a C++ kernel to the Python function that called it)."""
    own: Counter[str] = Counter()
    for frames, count in stacks:
        own[frames[-1]] += count
    return own.most_common(top)


def profile_backend(workload, backend: str, workdir: Path) -> list[tuple[list[str], int]]:
    raw, result = workdir / f"{backend}.txt", workdir / f"{backend}.json"
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    command = [
        py_spy, "record", "--subprocesses", "--rate", str(RATE_HZ), "--format", "raw",
        "--output", str(raw), "--",
        *offline_command(workload, model_path(workload.model, workdir, workload.scheme), result),
    ]  # fmt: skip
    print(f"[profile] {workload.name} on {backend} under py-spy ...", flush=True)
    finished = run(command, child_env(BACKENDS[backend]), timeout_s=3600)
    if finished.returncode != 0 or not raw.exists():
        raise RuntimeError(f"profiling {backend} failed:\n{finished.output[-4000:]}")
    return runner_stacks(read_stacks(raw))


def render(profiles: dict[str, list[tuple[list[str], int]]], top: int) -> str:
    ms = 1000 / RATE_HZ
    parts = {backend: part_samples(stacks) for backend, stacks in profiles.items()}
    totals = {backend: sum(count for _, count in stacks) for backend, stacks in profiles.items()}
    lines = [f"{'model runner time (s, sampled)':34} {'plugin':>9} {'in-tree':>9} {'ratio':>7}"]
    rows = [("whole step", totals["plugin"], totals["in-tree"])]
    rows += [(part, parts["plugin"][part], parts["in-tree"][part]) for part in PARTS]
    for label, plugin, in_tree in rows:
        ratio = f"{plugin / in_tree:7.2f}" if in_tree else "      -"
        lines.append(f"{label:34} {plugin * ms / 1000:9.2f} {in_tree * ms / 1000:9.2f} {ratio}")
    for backend, stacks in profiles.items():
        lines.append(f"\nwhere {backend} spends the model runner's time (innermost frames):")
        for frame, count in heaviest_frames(stacks, top):
            lines.append(f"  {100 * count / max(totals[backend], 1):5.1f}%  {frame[:110]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only", metavar="TEXT", default="64x128/128 eager",
        help="the `make bench` offline workload whose name contains TEXT",
    )  # fmt: skip
    parser.add_argument("--top", type=int, default=20, help="heaviest frames to list")
    parser.add_argument("--keep", metavar="DIR", type=Path, default=None,
                        help="keep py-spy's raw stacks and vLLM's results here")  # fmt: skip
    args = parser.parse_args()
    offline, _ = full_plan()
    matching = [w for w in offline if args.only in w.name]
    if not matching:
        parser.error(f"--only {args.only!r} matches no workload: {[w.name for w in offline]}")
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="vllm-kunlun-profile-"))
    workdir.mkdir(parents=True, exist_ok=True)
    profiles = {backend: profile_backend(matching[0], backend, workdir) for backend in BACKENDS}
    print(f"\n{matching[0].name}, sampled at {RATE_HZ} Hz\n")
    print(render(profiles, args.top))
    if args.keep is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
