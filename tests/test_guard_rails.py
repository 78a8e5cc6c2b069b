"""Options the plugin does not support yet are refused when the server starts, not at a request."""

import subprocess
import sys
from pathlib import Path

import pytest

from vllm_kunlun.local_server import free_port

VLLM_KUNLUN = str(Path(sys.executable).with_name("vllm-kunlun"))


@pytest.mark.parametrize(
    ("options", "names_the_option", "says_what_instead"),
    [
        (["--quantization", "fp8"], "--quantization fp8", "serve an unquantized checkpoint"),
        (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8", "use --kv-cache-dtype auto"),
        (["--block-size", "24"], "--block-size 24", "use a multiple of 16"),
    ],
)
def test_serve_refuses_unsupported_options_at_start_up(
    options, names_the_option, says_what_instead
):
    port = free_port()
    command = [VLLM_KUNLUN, "serve", "--emulate", "--port", str(port), *options]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert names_the_option in output and says_what_instead in output, output[-3000:]
    # It stopped before the API server came up.
    assert "Starting vLLM server" not in output and "Uvicorn running" not in output
