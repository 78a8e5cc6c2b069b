"""Each patch in vllm_kunlun.patches must still be needed, and must still work."""

import subprocess
import sys

CHECK = """
import importlib.metadata as m
try:
    m.version("vllm")
    print("vllm distribution found")
except m.PackageNotFoundError:
    print("vllm distribution missing")
from vllm_kunlun.patches import patch_vllm_distribution_name
patch_vllm_distribution_name()
print("patched:", m.version("vllm"))
"""


def test_vllm_cli_still_needs_the_distribution_patch():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    # When this fails, vLLM's CPU build publishes a "vllm" distribution: drop the patch.
    assert "vllm distribution missing" in out
    assert "patched: 0.32" in out and "+cpu" in out


def test_importing_the_plugin_applies_no_patch():
    code = "import importlib.metadata as m, vllm_kunlun.cli, vllm_kunlun.patches; " \
           "print(m.version.__module__)"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    assert out.strip() == "importlib.metadata"
