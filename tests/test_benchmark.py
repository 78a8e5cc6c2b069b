"""The benchmark runs end to end on a very small workload. Speed is judged by the benchmark's
own ratios (`make bench`), never by timed tests."""

import json
import subprocess
import sys

import pytest

from benchmarks.run import lower_is_better, main
from tests.engine import REPO

pytestmark = pytest.mark.engine


def test_quick_benchmark_compares_both_backends(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=1200)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (result,) = tmp_path.glob("bench-*.json")
    assert result.with_suffix(".png").stat().st_size > 0
    data = json.loads(result.read_text())
    assert {"machine", "torch", "vllm", "vllm-kunlun", "settings"} <= data["environment"].keys()
    backends = {(m["workload"], m["backend"]) for m in data["measurements"]}
    workloads = {w for w, _ in backends}
    assert backends == {(w, b) for w in workloads for b in ("plugin", "in-tree")}
    assert any(m["metrics"].get("ms per decode step", 0) > 0 for m in data["measurements"])
    assert any(w.startswith("MoE") for w in workloads)  # the MoE row, on a tiny MoE model
    assert "ratio" in proc.stdout


def test_latency_and_memory_are_lower_is_better():
    assert lower_is_better("ms per decode step") and lower_is_better("p99 ttft ms")
    assert lower_is_better("peak RSS GiB") and not lower_is_better("output tokens/s")


def test_only_filters_workloads_and_names_them_when_nothing_matches(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--only", "no such workload"])
    assert stopped.value.code == 2
    assert "'throughput 64x128/128 eager'" in capsys.readouterr().err


def test_the_quantized_rows_count_checkpoint_weight_bytes(tmp_path):
    """The W8A8 and W4A16 rows (full plan): the default model's w8a8-dynamic and w4a16
    checkpoints; their weight bytes are the tensors' bytes in the safetensors files, with and
    without the embedding and LM head (here against torch's count of the loaded tensors)."""
    import torch
    from safetensors.torch import load_file, save_file

    from benchmarks.run import OfflineWorkload, checkpoint_weight_bytes, full_plan

    quantized = [w for w in full_plan()[0] if w.scheme is not None]
    assert [(w.scheme, w.model) for w in quantized] == [("w8a8-dynamic", "default"),
                                                        ("w4a16", "default")]  # fmt: skip
    tensors = {"a": torch.ones(3, 5, dtype=torch.int8), "b": torch.ones(7, dtype=torch.bfloat16),
               "model.embed_tokens.weight": torch.ones(4, 2),
               "lm_head.weight": torch.ones(2)}  # fmt: skip
    save_file(tensors, str(tmp_path / "model.safetensors"))
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert checkpoint_weight_bytes(tmp_path) == sum(t.nbytes for t in loaded.values()) == 69
    assert checkpoint_weight_bytes(tmp_path, embeddings=False) == 29
    assert lower_is_better("weights MiB") and lower_is_better("non-embedding MiB")
    assert OfflineWorkload("x", "default", 1, 1, 1, "eager").scheme is None
