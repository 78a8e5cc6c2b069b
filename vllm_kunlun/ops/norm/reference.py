"""Reference norms: statistics in float32, results in x's dtype."""

import torch


def _inv_rms(x32: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight; normalized x is rounded to x's dtype before
    the weight multiplies it (the Llama convention)."""
    x32 = x.float()
    return ((x32 * _inv_rms(x32, eps)).to(x.dtype) * weight).to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """In place: residual <- x + residual, then x <- rms_norm(residual) * weight."""
    residual.add_(x)
    x.copy_(rms_norm(residual, weight, eps))


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * (1 + w), all in float32, then rounded (Gemma)."""
    x32 = x.float()
    return (x32 * _inv_rms(x32, eps) * (1.0 + weight.float())).to(x.dtype)


def gemma_fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """In place: residual <- x + residual, then x <- gemma_rms_norm(residual, w)."""
    residual.add_(x)
    x.copy_(gemma_rms_norm(residual, weight, eps))
