"""Gated MLP activations through the plugin's activation ops."""

import torch
from vllm.model_executor.layers.activation import GeluAndMul, SiluAndMul

from vllm_kunlun.ops import activation


class KunlunSiluAndMul(SiluAndMul):
    plugin_ops = ("silu_and_mul",)

    def forward_oot(self, x: torch.Tensor) -> torch.Tensor:
        return activation.silu_and_mul(x)

    forward_cpu = forward_oot


class KunlunGeluAndMul(GeluAndMul):
    plugin_ops = ("gelu_and_mul",)

    def forward_oot(self, x: torch.Tensor) -> torch.Tensor:
        return activation.gelu_and_mul(x, self.approximate)

    forward_cpu = forward_oot
