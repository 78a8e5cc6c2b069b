import subprocess
import sys

import pytest

from tests.engine import REPO

pytestmark = pytest.mark.engine


def test_demo_prints_a_coherent_reply():
    proc = subprocess.run([sys.executable, "scripts/demo.py"], cwd=REPO, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reply = [line for line in proc.stdout.splitlines() if line.startswith("==> reply:")]
    assert reply and "Paris" in reply[0], proc.stdout
    assert "==> server stopped" in proc.stdout
