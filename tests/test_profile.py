"""benchmarks/profile.py's reading of py-spy stacks (the profiling run itself is `make profile`)."""

from pathlib import Path

from benchmarks.profile import heaviest_frames, part_samples, read_stacks, runner_stacks

WORKER = 'process 7:"python -m worker"'
STEP = "GPUModelRunner.execute_model (vllm/v1/worker/gpu_model_runner.py:{})"
RAW = "\n".join([
    # plugin decode attention, twice at different lines of the same functions
    f"{WORKER};{STEP.format(10)};KunlunAttentionImpl.forward (vllm_kunlun/attention/backend.py:1);"
    "decode_attention (vllm_kunlun/ops/library.py:5) 30",
    f"{WORKER};{STEP.format(11)};KunlunAttentionImpl.forward (vllm_kunlun/attention/backend.py:2);"
    "decode_attention (vllm_kunlun/ops/library.py:6) 12",
    # a GEMM inside the MLP; a norm that calls itself through two frames of the same name
    f"{WORKER};{STEP.format(10)};LlamaMLP.forward (vllm/llama.py:3);"
    "cpu_unquantized_gemm (vllm/utils.py:4) 20",
    f"{WORKER};{STEP.format(10)};fused_add_rms_norm (vllm_kunlun/ops/library.py:70);"
    "fused_add_rms_norm (vllm_kunlun/ops/reference/norm.py:16) 8",
    f"{WORKER};GPUModelRunner.sample_tokens (vllm/v1/worker/gpu_model_runner.py:9) 5",
    # outside the model runner: the engine core waiting for the worker
    'process 6:"python -m engine";EngineCore.step (vllm/v1/engine/core.py:1);'
    "sched_yield (vllm/distributed/utils.py:2) 99",
    "not a stack line",
])  # fmt: skip


def stacks(tmp_path: Path):
    raw = tmp_path / "plugin.txt"
    raw.write_text(RAW)
    return runner_stacks(read_stacks(raw))


def test_only_model_runner_samples_count_and_line_numbers_are_dropped(tmp_path):
    kept = stacks(tmp_path)
    assert sum(count for _, count in kept) == 30 + 12 + 20 + 8 + 5
    assert all(frames[0].startswith("GPUModelRunner.") for frames, _ in kept)
    assert kept[0][0][0] == "GPUModelRunner.execute_model (vllm/v1/worker/gpu_model_runner.py)"


def test_parts_add_samples_once_per_stack(tmp_path):
    parts = part_samples(stacks(tmp_path))
    assert parts["attention"] == 42
    assert parts["  of which decode"] == 42
    assert parts["  of which prefill"] == 0
    assert parts["GEMMs (linear layers, LM head)"] == 20
    assert parts["RMSNorm"] == 8  # not 16: the two frames are one sample
    assert parts["sampling"] == 5


def test_heaviest_frames_are_innermost_and_merge_lines_of_one_function(tmp_path):
    top = heaviest_frames(stacks(tmp_path), top=2)
    assert top == [
        ("decode_attention (vllm_kunlun/ops/library.py)", 42),
        ("cpu_unquantized_gemm (vllm/utils.py)", 20),
    ]
