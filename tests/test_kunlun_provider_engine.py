"""The Kunlun binding inside a real vLLM engine, on the emulated device with the stand-in
kunlun_ops (tests/standin): the binding is chosen automatically, every kernel family goes through
it, and greedy decoding gives the same tokens as the reference kernels."""

import json
import os
from pathlib import Path

import pytest
import torch

from tests.engine import PROMPTS, emulation_env, read_op_stats, run_generation
from tests.ops.kv_cache.shared import kv_page_views
from vllm_kunlun.attention.backend import split_kv_cache
from vllm_kunlun.ops.provider import Provider

STANDIN = Path(__file__).parent / "standin"
MAX_TOKENS = 32
PLUGIN_OPS = ("prefill_attention", "decode_attention", "reshape_and_cache", "rms_norm",
              "fused_add_rms_norm", "rotary_embedding", "silu_and_mul")  # fmt: skip
VENDOR_FUNCTIONS = ("prefill_attention", "speculative_attention", "reshape_and_cache_flash",
                    "rmsnorm", "add_rmsnorm", "rotary_embedding", "swiglu")  # fmt: skip


def read_standin_calls(directory: Path) -> dict[str, int]:
    total: dict[str, int] = {}
    for path in directory.glob("calls-*.json"):
        for name, count in json.loads(path.read_text()).items():
            total[name] = total.get(name, 0) + count
    return total


def generate(model: Path, kernels: str, tmp_path: Path) -> tuple[dict, dict, dict]:
    """Greedy run with `kernels`; returns (result, plugin op counts, stand-in call counts)."""
    stats_dir, calls_dir = tmp_path / f"ops-{kernels}", tmp_path / f"calls-{kernels}"
    # Engine workers are separate processes: the stand-in must be importable through the env,
    # and tests/generate.py sends them its write_calls function (a pickled callable).
    pythonpath = os.pathsep.join(p for p in (str(STANDIN), os.environ.get("PYTHONPATH")) if p)
    env = emulation_env(stats_dir, VLLM_KUNLUN_KERNELS=kernels, PYTHONPATH=pythonpath,
                        KUNLUN_STANDIN_CALLS=str(calls_dir),
                        VLLM_ALLOW_INSECURE_SERIALIZATION="1")  # fmt: skip
    result = run_generation(model, PROMPTS, MAX_TOKENS, env=env, dtype="float32")
    assert result["platform"] == "EmulatedKunlunPlatform"
    return result, read_op_stats(stats_dir), read_standin_calls(calls_dir)


@pytest.mark.engine
def test_kunlun_provider_matches_reference_in_the_engine(default_model, tmp_path):
    kunlun, kunlun_ops, vendor_calls = generate(default_model, "auto", tmp_path)
    reference, _, reference_vendor_calls = generate(default_model, "reference", tmp_path)

    assert f"vllm-kunlun kernel provider: {Provider('kunlun').description}" in kunlun["log"]
    assert "rmsnorm uses the active form" in kunlun["log"]
    assert f"vllm-kunlun kernel provider: {Provider('reference').description}" in reference["log"]

    for i, (got, want) in enumerate(zip(kunlun["token_ids"], reference["token_ids"], strict=True)):
        assert got == want, f"prompt {i} ({PROMPTS[i]!r}) diverges:\n kunlun {got}\n ref    {want}"

    missing = [op for op in PLUGIN_OPS if kunlun_ops.get(op, 0) == 0]
    assert not missing, f"plugin ops that never ran: {missing}; counts: {kunlun_ops}"
    silent = [fn for fn in VENDOR_FUNCTIONS if vendor_calls.get(fn, 0) == 0]
    assert not silent, f"kunlun_ops functions never called: {silent}; calls: {vendor_calls}"
    assert vendor_calls["speculative_attention"] == kunlun_ops["decode_attention"]
    assert vendor_calls["prefill_attention"] == kunlun_ops["prefill_attention"]
    assert reference_vendor_calls == {}


def test_the_kernel_tests_use_the_backends_kv_cache_layout():
    """tests/ops cannot import the attention backend (it imports vLLM), so it repeats
    split_kv_cache's layout (tests/ops/kv_cache/shared.py): the two must agree."""
    buffer = torch.randn(5, 2, 16, 2 * 8)
    for ours, backends in zip(kv_page_views(buffer), split_kv_cache(buffer), strict=True):
        assert ours.shape == backends.shape and ours.stride() == backends.stride()
        assert ours.data_ptr() == backends.data_ptr()
