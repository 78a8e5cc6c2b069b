"""`vllm-kunlun check-kernels`: the reference and compiled providers pass on the host, the
Kunlun binding runs end to end on the stand-in library, a broken kernel fails naming its op,
and the command needs no vLLM."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_kunlun.ops.check import cli
from vllm_kunlun.ops.check.runner import cases_by_op
from vllm_kunlun.ops.provider import Provider, declared_ops

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "tests" / "standin"
#: Runs check-kernels with vLLM unimportable, then reports whether any vllm module loaded.
WITHOUT_VLLM = (
    "import sys; sys.modules['vllm'] = None\n"
    "from vllm_kunlun.cli import main\n"
    "code = main(['check-kernels', *sys.argv[1:]])\n"
    "loaded = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')"
    " if sys.modules[m] is not None]\n"
    "print('VLLM MODULES', loaded)\n"
    "sys.exit(code)\n"
)


#: MLA ops whose Kunlun kernels take cache rows of kv_lora_rank 512 + rope 64 only.
MLA_512_64_ONLY = ("concat_and_cache_mla", "mla_decode")


def run_without_vllm(*args: str, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_VLLM, *args],
        cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.parametrize("provider", ["reference", "compiled"])
def test_provider_passes_on_the_host_without_vllm(provider, tmp_path):
    report = tmp_path / "report.json"
    proc = run_without_vllm("--provider", provider, "--quick", "--json", str(report))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "VLLM MODULES []" in proc.stdout
    document = json.loads(report.read_text())
    assert document["schema"] == cli.SCHEMA
    assert document["provider"] == provider and document["device"] == "cpu"
    checked = {r["op"] for r in document["results"]}
    assert checked == set(declared_ops()), "every declared op is checked"
    statuses = {r["status"] for r in document["results"]}
    assert statuses == {"pass"}
    dtypes = {r["dtype"] for r in document["results"]}
    assert dtypes == {"float32", "bfloat16", "float16"}
    assert document["summary"]["pass"] == len(document["results"])
    first = document["results"][0]
    assert set(first) >= {"op", "case", "dtype", "status", "max_abs_error", "max_rel_error",
                          "atol", "rtol", "median_ms", "host_syncs", "graph_capturable",
                          "kernel"}  # fmt: skip


def test_kunlun_provider_runs_end_to_end_on_the_standin(tmp_path):
    report = tmp_path / "kunlun.json"
    proc = run_without_vllm(
        "--provider", "kunlun", "--quick", "--json", str(report),
        env={"PYTHONPATH": os.pathsep.join([str(STANDIN), os.environ.get("PYTHONPATH", "")]),
             "KUNLUN_STANDIN_FORM": "active"},
    )  # fmt: skip
    assert report.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    document = json.loads(report.read_text())
    assert document["provider"] == "kunlun"
    assert document["kunlun_ops"] == "0.1.58+standin"
    results = document["results"]
    assert {r["op"] for r in results} == set(declared_ops())
    # The binding raises NotImplementedError for soft-capping (no recorded kernel parameter) and
    # for MLA cache rows other than 512 + 64 (the only recorded size): reported as unsupported,
    # not as a failure. Everything else must pass, every 512 + 64 MLA case included.
    unsupported = {(r["op"], r["case"]) for r in results if r["status"] == "unsupported"}
    assert any("soft-cap" in case for _, case in unsupported)
    assert ("mla_decode", "latent 64+32, bs 16, ragged") in unsupported
    for op, case in unsupported:
        assert "soft-cap" in case or (op in MLA_512_64_ONLY and "512+64" not in case), (op, case)
    assert {r["op"] for r in results if r["status"] == "pass"} >= set(MLA_512_64_ONLY)
    failed = [r for r in results if r["status"] not in ("pass", "unsupported")]
    assert not failed, failed[:3]
    assert proc.returncode == 0, proc.stdout[-3000:]
    kernels = {r["op"]: r["kernel"] for r in results}
    assert kernels["rms_norm"] == "norm.kunlun"
    assert kernels["gelu_and_mul"] == "activation.reference"  # no recorded Kunlun kernel
    assert kernels["mla_decode"] == "mla.kunlun"


def test_a_broken_kernel_fails_naming_its_op(monkeypatch, capsys, tmp_path):
    broken = Provider("reference")

    def off_by_ten_percent(x, weight, eps):
        return Provider("reference").kernel("rms_norm")(x, weight, eps) * 1.1

    broken.kernels["rms_norm"] = off_by_ten_percent
    monkeypatch.setattr(cli, "choose_provider", lambda choice: broken)
    report = tmp_path / "broken.json"
    code = cli.main(["--ops", "rms_norm,silu_and_mul", "--quick", "--json", str(report)])
    out = capsys.readouterr().out
    assert code == 1
    assert "failed ops: rms_norm" in out
    results = json.loads(report.read_text())["results"]
    assert {r["status"] for r in results if r["op"] == "rms_norm"} == {"FAIL"}
    assert {r["status"] for r in results if r["op"] == "silu_and_mul"} == {"pass"}


def test_a_crashing_kernel_is_an_error_and_the_run_goes_on(monkeypatch, capsys):
    broken = Provider("reference")

    def crash(*args):
        raise RuntimeError("kernel launch failed")

    broken.kernels["silu_and_mul"] = crash
    monkeypatch.setattr(cli, "choose_provider", lambda choice: broken)
    code = cli.main(["--ops", "silu_and_mul,gelu_and_mul", "--quick", "--dtypes", "float32"])
    out = capsys.readouterr().out
    assert code == 1
    assert "RuntimeError: kernel launch failed" in out
    assert "failed ops: silu_and_mul" in out


def test_bad_arguments_exit_2(capsys):
    assert cli.main(["--ops", "no_such_op"]) == 2
    assert "unknown op(s) no_such_op" in capsys.readouterr().err
    assert cli.main(["--dtypes", "int8"]) == 2


def test_every_declared_op_has_cases_with_awkward_shapes():
    cases = cases_by_op()
    for op in declared_ops():
        names = [c.name for c in cases[op]]
        assert len(names) >= 3, op
        assert any(c.big for c in cases[op]) or op in ("gelu_and_mul",), op


def test_cases_build_on_any_device_and_keep_views_strided():
    case = next(c for c in cases_by_op()["rotary_embedding"] if c.name == "fused qkv views")
    args = case.make(torch.bfloat16, torch.device("cpu"), torch.Generator().manual_seed(0))
    query, key = args[1], args[2]
    assert not query.is_contiguous() and not key.is_contiguous()
    assert query.dtype == key.dtype == torch.bfloat16
