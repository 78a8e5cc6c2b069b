"""Run several `vllm-kunlun plan` command lines in one fresh process (one vLLM import) and print
each one's exit status, output and JSON plan.

Usage: python -m tests.plan_probe CALLS_JSON, a list of argument lists (what follows
`vllm-kunlun plan`). Prints one line: RESULT [{"argv", "code", "stdout", "stderr", "plan"}].
"""

import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path


def run(argv: list[str]) -> dict:
    from vllm_kunlun.plan.cli import main

    out, err = io.StringIO(), io.StringIO()
    with tempfile.TemporaryDirectory() as scratch:
        json_path = Path(scratch) / "plan.json"
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([*argv, "--json", str(json_path)])
            except SystemExit as exit_:  # argparse's own errors
                code = exit_.code
        plan = json.loads(json_path.read_text()) if json_path.exists() else None
    return {"argv": argv, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
            "plan": plan}  # fmt: skip


def main() -> None:
    results = [run(argv) for argv in json.loads(sys.argv[1])]
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
