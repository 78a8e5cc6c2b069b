"""The soak (benchmarks/soak.py) at CI size: load, hang-ups and bad input through the plugin."""

import json
import subprocess
import sys

import pytest

from benchmarks.soak import INVALID_KINDS, plan
from tests.engine import REPO

pytestmark = pytest.mark.engine

REQUESTS, CONCURRENCY = 40, 8


def test_plan_mixes_every_kind_of_request():
    mix = plan(300, seed=0)
    invalid = [r for r in mix if r.kind in INVALID_KINDS]
    assert {r.kind for r in invalid} == set(INVALID_KINDS)
    assert len(invalid) == 15  # 5%
    streams = [r for r in mix if r.stream]
    cancelled = [r for r in streams if r.cancel_after is not None]
    assert 0.05 < len(cancelled) / len(mix) < 0.15  # about 10% of all requests
    valid = [r for r in mix if r.kind not in INVALID_KINDS]
    assert min(r.prompt_tokens for r in valid) < 50 and max(r.prompt_tokens for r in valid) > 1000
    assert {r.kind for r in valid} == {"chat", "completion"}


def test_ci_size_soak_passes_every_check(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--requests", str(REQUESTS),
         "--concurrency", str(CONCURRENCY), "--recheck", "8", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    [result_file] = tmp_path.glob("soak-*.json")
    summary = json.loads(result_file.read_text())
    mix = plan(REQUESTS, seed=0)
    invalid = sum(r.kind in INVALID_KINDS for r in mix)
    cancelled = sum(r.cancel_after is not None for r in mix)
    assert summary["sent"] == REQUESTS
    assert summary["rejected_4xx"] == invalid
    assert summary["cancelled"] == cancelled
    assert summary["completed"] == REQUESTS - invalid - cancelled
    assert summary["server_errors_5xx"] == summary["timeouts"] == summary["other_failures"] == 0
    assert summary["preemptions"] > 0, "the small KV cache should force preemption"
    assert summary["health_after"] and summary["fresh_request_after"]
    assert summary["greedy_rechecked"] > 0 and summary["greedy_mismatches"] == 0
    assert "verdict              PASS" in proc.stdout
