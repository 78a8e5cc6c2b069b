import os
import subprocess
import sys
from pathlib import Path

from vllm_kunlun.cli import build_argv

CLI = str(Path(sys.executable).with_name("vllm-kunlun"))


def run_cli(*args: str, emulate: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_KUNLUN_EMULATE")}
    if emulate:
        env["VLLM_KUNLUN_EMULATE"] = "1"
    return subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=300)


def test_serve_without_a_device_says_how_to_emulate():
    proc = run_cli("serve")
    assert proc.returncode == 2
    assert "no Kunlun XPU was found" in proc.stderr
    assert "--emulate" in proc.stderr and "VLLM_KUNLUN_EMULATE=1" in proc.stderr


def test_default_model_prints_the_prepared_folder(default_model):
    proc = run_cli("default-model")
    assert proc.returncode == 0, proc.stderr
    folder = Path(proc.stdout.strip())
    assert folder == default_model
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()


def test_serve_fills_in_the_default_model(default_model):
    assert build_argv(["serve", "--port", "8000"]) == [
        "serve",
        str(default_model),
        "--port",
        "8000",
    ]
    assert build_argv(["serve", "my/model", "--port", "1"]) == ["serve", "my/model", "--port", "1"]
    assert build_argv(["serve", "--model", "m"]) == ["serve", "--model", "m"]
    assert build_argv(["bench", "throughput"]) == ["bench", "throughput"]


def test_version_runs_despite_the_cpu_build_distribution_name():
    proc = run_cli("--version")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().startswith("0.32")
