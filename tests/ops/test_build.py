"""Building the emulated device's C++ kernels (vllm_kunlun/ops/build.py): one build per source,
torch and CPU type, and the layouts the row kernels take."""

import torch

from vllm_kunlun.ops import build


def test_the_build_is_cached_per_source_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_KUNLUN_CACHE_DIR", str(tmp_path))
    first = build.build_directory()
    assert first.parent == tmp_path / "kernels"
    monkeypatch.setattr(build, "_cpu_flags", lambda: "flags : other cpu")
    assert build.build_directory() != first


def test_row_layout_takes_contiguous_host_rows_of_one_float32_or_bfloat16_dtype():
    x = torch.randn(3, 8)
    assert build.row_layout(x, torch.randn(8))
    assert build.row_layout(x.bfloat16(), torch.randn(8).bfloat16())
    assert not build.row_layout(x.half(), torch.randn(8).half())  # float16 stays with torch
    assert not build.row_layout(x, torch.randn(8).bfloat16())  # mixed dtypes
    assert not build.row_layout(torch.randn(3, 16)[:, :8], torch.randn(8))  # strided
    assert build.on_host(x, x) and not build.on_host(x, torch.empty(1, device="meta"))
