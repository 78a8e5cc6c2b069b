"""`vllm-kunlun check-kernels`: check every op of the kernel seam on this host.

    vllm-kunlun check-kernels [--provider auto|reference|compiled|kunlun] [--device DEVICE]
                              [--ops OP,...] [--dtypes float32,...] [--quick] [--json PATH]

Prints one row per case as it runs, then a summary; exit status 1 when any case fails or
errors, 2 for bad arguments. Needs torch and the plugin's kernel layer only, not vLLM
(`python -m vllm_kunlun.ops.check` runs it too). The JSON schema is in docs/check-kernels.md.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from vllm_kunlun.ops.check.runner import DTYPES, ERROR, FAIL, PASS, UNSUPPORTED, Result, cases_by_op
from vllm_kunlun.ops.provider import KERNEL_CHOICES, choose_provider, declared_ops

SCHEMA = "vllm-kunlun/check-kernels/1"
COLUMNS = ("op", "case", "dtype", "status", "max abs err", "max rel err", "median ms",
           "host syncs", "graph")  # fmt: skip
WIDTHS = (26, 34, 9, 11, 11, 11, 10, 10, 8)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vllm-kunlun check-kernels",
        description="Run every kernel-seam op on a provider and device against the reference "
        "kernels on the host (float64), over a fixed, seeded case set per op.",
    )
    parser.add_argument(
        "--provider",
        default=None,
        choices=KERNEL_CHOICES,
        help="kernels to check (default: VLLM_KUNLUN_KERNELS, what serving would pick here)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="torch device to run on: cpu, cuda, cuda:1 (default: cuda when "
        "torch sees one, else cpu); Kunlun XPUs are 'cuda' under xpytorch",
    )
    parser.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    parser.add_argument(
        "--dtypes", default=",".join(DTYPES), help=f"comma-separated, from {', '.join(DTYPES)}"
    )
    parser.add_argument("--quick", action="store_true", help="skip the large cases")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls per case (default 10, 3 with --quick)",
    )
    parser.add_argument("--json", dest="json_path", default=None, help="also write JSON here")
    return parser.parse_args(argv)  # fmt: skip


def _cell(value, width: int) -> str:
    if isinstance(value, float):
        text = f"{value:.2e}" if value and (value < 1e-2 or value >= 1e4) else f"{value:.3f}"
    else:
        text = "-" if value is None else str(value)
    return text[:width].ljust(width)


def _row(values) -> str:
    return " ".join(_cell(v, w) for v, w in zip(values, WIDTHS, strict=True)).rstrip()


def _print_result(result: Result) -> None:
    print(_row((result.op, result.case, result.dtype, result.status, result.max_abs_error,
                result.max_rel_error, result.median_ms, result.host_syncs,
                result.graph_capturable.split(" ")[0])), flush=True)  # fmt: skip
    if result.status in (FAIL, ERROR, UNSUPPORTED) and result.message:
        print(f"    {result.message}", flush=True)


def _selected_ops(names: str) -> list[str]:
    declared = list(declared_ops())
    if not names:
        return declared
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in declared]
    if unknown:
        raise ValueError(f"unknown op(s) {', '.join(unknown)}; ops: {', '.join(declared)}")
    return chosen


def run(argv: list[str]) -> int:
    from vllm_kunlun.ops.check.runner import run_case

    args = parse_args(argv)
    try:
        ops = _selected_ops(args.ops)
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        if bad := [d for d in dtypes if d not in DTYPES]:
            raise ValueError(f"unknown dtype(s) {', '.join(bad)}; from {', '.join(DTYPES)}")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.empty(1, device=device)  # fails here, clearly, for a device torch cannot use
    except (ValueError, RuntimeError) as error:
        print(f"vllm-kunlun check-kernels: {error}", file=sys.stderr)
        return 2
    try:
        provider = choose_provider(args.provider).prepare()
    except RuntimeError as error:  # a provider that cannot load says what to install
        print(f"vllm-kunlun check-kernels: {error}", file=sys.stderr)
        return 2
    repeats = args.repeats or (3 if args.quick else 10)
    cases = cases_by_op()
    specs = declared_ops()
    print(f"vllm-kunlun check-kernels: provider {provider.name} ({provider.description}), "
          f"device {device}, torch {torch.__version__}, {len(ops)} ops", flush=True)  # fmt: skip
    print(_row(COLUMNS))
    results: list[Result] = []
    started = time.monotonic()
    for index, op in enumerate(ops, 1):
        print(f"[{index}/{len(ops)}] {op} ({provider.sources[op]})", flush=True)
        if not cases[op]:
            result = Result(op, "-", "-", FAIL, message="no check-kernels cases for this op")
            results.append(result)
            _print_result(result)
        for case in cases[op]:
            if args.quick and case.big:
                continue
            for dtype in dtypes:
                result = run_case(specs[op], case, dtype, provider, device, repeats)
                results.append(result)
                _print_result(result)
    summary = {status: sum(r.status == status for r in results)
               for status in (PASS, FAIL, ERROR, UNSUPPORTED)}  # fmt: skip
    failed = [r for r in results if r.status in (FAIL, ERROR)]
    print(f"\n{len(results)} cases in {time.monotonic() - started:.0f} s: "
          + ", ".join(f"{count} {status}" for status, count in summary.items()))  # fmt: skip
    if failed:
        print("failed ops: " + ", ".join(sorted({r.op for r in failed})))
    if args.json_path:
        _write_json(Path(args.json_path), provider, device, results, summary)
    return 1 if failed else 0


def _write_json(path: Path, provider, device, results: list[Result], summary: dict) -> None:
    import importlib.util

    kunlun_ops = None
    if importlib.util.find_spec("kunlun_ops") is not None:
        import kunlun_ops

        kunlun_ops = getattr(kunlun_ops, "__version__", "unknown")
    document = {
        "schema": SCHEMA,
        "provider": provider.name,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "host",
        "torch": torch.__version__,
        "kunlun_ops": kunlun_ops,
        "summary": summary,
        "results": [r.to_json() for r in results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1))
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    return run(sys.argv[1:] if argv is None else argv)
