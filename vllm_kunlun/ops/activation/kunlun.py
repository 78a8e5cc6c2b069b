"""Kunlun binding of the activation family (KUNLUN.md §2b). Needs a Kunlun XPU.

- swiglu: silu on the first half, times the second half, is assumed (vLLM's convention, §4.4).
- gelu_and_mul: KUNLUN.md records no reliable fused GELU-and-mul kernel, so it runs the
  reference's PyTorch ops on the XPU (unverified on hardware).
"""

import torch

from vllm_kunlun.ops.activation import reference
from vllm_kunlun.ops.kunlun_library import check_keywords, dense, library

KEYWORDS = {"swiglu": ("x", "y")}


def prepare() -> None:
    check_keywords(KEYWORDS)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    y = x.new_empty(*x.shape[:-1], x.shape[-1] // 2)
    library().swiglu(x=dense(x), y=y)
    return y


gelu_and_mul = reference.gelu_and_mul
