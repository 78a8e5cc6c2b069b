"""Plain formulas of the norm family, in float64 (the oracles of its reference, compiled and
Kunlun tests), and the Gemma formula as vLLM writes it."""

import torch


def plain_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x64, w64 = x.double(), weight.double()
    mean_square = (x64 * x64).sum(dim=-1, keepdim=True) / x.shape[-1]
    return x64 / torch.sqrt(mean_square + eps) * w64


def plain_gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma stores w and scales by (1 + w)."""
    x64 = x.double()
    mean_square = (x64 * x64).sum(dim=-1, keepdim=True) / x.shape[-1]
    return x64 / torch.sqrt(mean_square + eps) * (1.0 + weight.double())


def vllm_gemma_formula(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """vLLM's GemmaRMSNorm.forward_static, written out (kernel tests never import vLLM): all in
    float32, scaled by (1 + w.float()), rounded to x's dtype once at the end."""
    x32 = x.float()
    variance = x32.pow(2).mean(dim=-1, keepdim=True)
    return (x32 * torch.rsqrt(variance + eps) * (1.0 + weight.float())).to(x.dtype)
