"""RMSNorm in the Llama and the Gemma convention, through the plugin's norm ops."""

import torch
from vllm.model_executor.layers.layernorm import GemmaRMSNorm, RMSNorm

from vllm_kunlun.ops import norm


class KunlunRMSNorm(RMSNorm):
    plugin_ops = ("rms_norm", "fused_add_rms_norm")

    def forward_oot(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.variance_size_override is not None:
            # Statistics over a prefix of the hidden size (a few VLM towers); no kernel for it.
            return self.forward_native(x, residual)
        if residual is None:
            return norm.rms_norm(x, self.weight.data, self.variance_epsilon)
        norm.fused_add_rms_norm(x, residual, self.weight.data, self.variance_epsilon)
        return x, residual

    forward_cpu = forward_oot


class KunlunGemmaRMSNorm(GemmaRMSNorm):
    """Gemma's convention: the checkpoint stores w and the norm scales by (1 + w), in float32."""

    plugin_ops = ("gemma_rms_norm", "gemma_fused_add_rms_norm")

    def forward_oot(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return norm.gemma_rms_norm(x, self.weight.data, self.variance_epsilon)
        norm.gemma_fused_add_rms_norm(x, residual, self.weight.data, self.variance_epsilon)
        return x, residual

    forward_cpu = forward_oot
