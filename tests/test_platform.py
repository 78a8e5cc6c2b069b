"""Platform selection, device facts and config checks."""

import importlib
import json
import subprocess
import sys

import pytest

from tests.engine import REPO, emulation_env, read_op_stats, run_generation

PROBE = """
import json
from vllm.platforms import current_platform as p
facts = {"platform": type(p).__name__, "module": type(p).__module__}
if facts["module"].startswith("vllm_kunlun.platform"):
    facts.update(name=p.get_device_name(), count=p.device_count(), is_cpu=p.is_cpu(),
                 oot=p.is_out_of_tree(), total=p.get_device_total_memory(0),
                 free=p.get_device_free_memory(0))
print("FACTS " + json.dumps(facts))
"""


def probe(env: dict[str, str | None]) -> dict:
    import os

    child_env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_KUNLUN")}
    child_env.update({k: v for k, v in env.items() if v is not None})
    proc = subprocess.run([sys.executable, "-c", PROBE], env=child_env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FACTS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][6:])


def test_emulation_selects_the_kunlun_platform():
    facts = probe({"VLLM_KUNLUN_EMULATE": "1", "VLLM_KUNLUN_EMULATED_MEMORY_GIB": "3"})
    assert facts["platform"] == "EmulatedKunlunPlatform"
    assert facts["module"] == "vllm_kunlun.platform.emulated"
    assert "emulated" in facts["name"] and "Kunlun" in facts["name"]
    assert facts["oot"] and facts["is_cpu"]
    assert facts["count"] == 1
    assert facts["total"] == 3 * (1 << 30)
    assert facts["free"] == facts["total"]


def test_without_emulation_vllm_uses_its_cpu_platform():
    assert probe({})["platform"] == "CpuPlatform"
    assert probe({"VLLM_KUNLUN_EMULATE": "0"})["platform"] == "CpuPlatform"


def test_xpu_visible_devices_is_honoured_and_checked():
    assert probe({"VLLM_KUNLUN_EMULATE": "1", "XPU_VISIBLE_DEVICES": "0"})["count"] == 1
    from vllm_kunlun import envs

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XPU_VISIBLE_DEVICES", "0,3")
        with pytest.raises(ValueError, match="only 2 device"):
            envs.visible_device_indices(2)
        mp.setenv("XPU_VISIBLE_DEVICES", "zero")
        with pytest.raises(ValueError, match="comma-separated"):
            envs.visible_device_indices(2)
        mp.setenv("XPU_VISIBLE_DEVICES", "1")
        assert envs.visible_device_indices(2) == [1]


def test_register_is_idempotent_and_silent_without_a_device(monkeypatch):
    import vllm_kunlun

    monkeypatch.delenv("VLLM_KUNLUN_EMULATE", raising=False)
    assert vllm_kunlun.register() is None
    monkeypatch.setenv("VLLM_KUNLUN_EMULATE", "1")
    assert vllm_kunlun.register() == vllm_kunlun.register() == vllm_kunlun.EMULATED_PLATFORM_PATH


def test_each_runtime_names_a_platform_register_ops_recognises():
    import vllm_kunlun
    from vllm_kunlun.device import EmulatedRuntime, XpuRuntime

    paths = (EmulatedRuntime.platform_cls, XpuRuntime.platform_cls)
    assert paths == (vllm_kunlun.EMULATED_PLATFORM_PATH, vllm_kunlun.XPU_PLATFORM_PATH)
    assert set(paths) == set(vllm_kunlun.PLATFORM_PATHS)
    for path in paths:
        module, _, name = path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        assert f"{cls.__module__}.{cls.__qualname__}" == path


def test_the_emulated_platform_builds_on_vllms_cpu_platform():
    from vllm.platforms.cpu import CpuPlatform

    from vllm_kunlun.platform import EmulatedKunlunPlatform, KunlunPlatformBase

    assert EmulatedKunlunPlatform.__mro__[1:3] == (KunlunPlatformBase, CpuPlatform)
    assert EmulatedKunlunPlatform.dist_backend == "gloo"
    assert EmulatedKunlunPlatform.device_type == "cpu"


def test_emulated_memory_budget_errors_are_clear(monkeypatch):
    from vllm_kunlun.device import EmulatedRuntime

    runtime = EmulatedRuntime()
    monkeypatch.setenv("VLLM_KUNLUN_EMULATED_MEMORY_GIB", "lots")
    with pytest.raises(ValueError, match="not a number of GiB"):
        runtime.total_memory()
    monkeypatch.setenv("VLLM_KUNLUN_EMULATED_MEMORY_GIB", "100000")
    with pytest.raises(ValueError, match="host's"):
        runtime.total_memory()
    monkeypatch.setenv("VLLM_KUNLUN_EMULATED_MEMORY_GIB", "1")
    runtime.record_allocation(0, 1 << 29)
    assert runtime.free_memory(0) == 1 << 29


@pytest.mark.parametrize(
    ("version", "supported"),
    [("0.32.0", True), ("0.32.5+cpu", True), ("0.31.9", False), ("0.33.0", False), ("x", False)],
)
def test_vllm_version_range(version, supported):
    from vllm_kunlun.compat import is_supported

    assert is_supported(version) is supported


def test_unsupported_vllm_is_refused_with_the_range(monkeypatch):
    from vllm_kunlun import compat

    monkeypatch.setattr(compat, "installed_vllm_version", lambda: "0.30.1")
    with pytest.raises(RuntimeError, match=r"supports vLLM >=0.32, <0.33.*0.30.1"):
        compat.check_vllm_version()


@pytest.mark.engine
def test_no_plugin_op_runs_without_emulation(tiny_model_factory, tmp_path):
    stats_dir = tmp_path / "ops"
    env = {"VLLM_KUNLUN_EMULATE": None, "VLLM_KUNLUN_OP_STATS": str(stats_dir)}
    result = run_generation(tiny_model_factory("llama"), ["Hello"], 4, env=env,
                            gpu_memory_utilization=0.3)  # fmt: skip
    assert result["platform"] == "CpuPlatform"
    assert read_op_stats(stats_dir) == {}


@pytest.mark.engine
def test_unsupported_options_are_refused_at_start_up(tiny_model_factory):
    with pytest.raises(AssertionError, match="--kv-cache-dtype fp8 is not supported"):
        run_generation(tiny_model_factory("llama"), ["Hello"], 2, env=emulation_env(),
                       kv_cache_dtype="fp8")  # fmt: skip


@pytest.mark.parametrize(
    "attn_type,extra,named",
    [
        ("encoder_decoder", {}, "attention type 'encoder_decoder'"),
        ("encoder", {}, "attention type 'encoder'"),
        ("encoder_only", {"sliding_window": 8}, "sliding windows or soft-capping"),
        ("decoder", {"alibi_slopes": [0.5, 0.25]}, "ALiBi"),
    ],
)
def test_attention_backend_names_what_it_cannot_run(attn_type, extra, named):
    from vllm_kunlun.attention.backend import KunlunAttentionBackend, KunlunAttentionImpl

    with pytest.raises(NotImplementedError, match=named) as refused:
        KunlunAttentionImpl(2, 32, 0.125, attn_type=attn_type, **extra)
    assert "docs/support-matrix.md" in str(refused.value)
    assert KunlunAttentionBackend.supports_attn_type(attn_type) == (
        attn_type in ("decoder", "encoder_only")
    )


def test_metadata_builder_refuses_per_request_causal_masks():
    from types import SimpleNamespace

    import torch

    from vllm_kunlun.attention.metadata import KunlunAttentionMetadataBuilder

    batch = SimpleNamespace(causal=torch.tensor([True, False]))
    with pytest.raises(NotImplementedError, match="per-request causal masks"):
        KunlunAttentionMetadataBuilder.build(None, 0, batch)
