"""vLLM layers whose forward the plugin owns, registered with CustomOp.register_oot.

vLLM instantiates these in place of its own classes. Both `forward_oot` (the dispatch for an
out-of-tree platform) and `forward_cpu` (taken first, because the emulated platform answers
is_cpu()) go to the plugin ops, so vLLM's in-tree CPU kernels never run for these layers.
"""

import torch
from vllm.model_executor.custom_op import CustomOp
from vllm.model_executor.layers.activation import GeluAndMul, SiluAndMul
from vllm.model_executor.layers.layernorm import GemmaRMSNorm, RMSNorm
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

from vllm_kunlun.ops import library as ops


def _normalize(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm's two forms: normalize x, or add x to the residual (in place) and normalize."""
    if residual is None:
        return ops.rms_norm(x, weight, eps)
    ops.fused_add_rms_norm(x, residual, weight, eps)
    return x, residual


class KunlunRMSNorm(RMSNorm):
    def forward_oot(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.variance_size_override is not None:
            # Statistics over a prefix of the hidden size (a few VLM towers); no kernel for it.
            return self.forward_native(x, residual)
        return _normalize(x, residual, self.weight.data, self.variance_epsilon)

    forward_cpu = forward_oot


class KunlunRotaryEmbedding(RotaryEmbedding):
    def forward_oot(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cos_sin_cache = self._match_cos_sin_cache_dtype(query)
        ops.rotary_embedding(
            positions, query, key, self.head_size, cos_sin_cache, self.is_neox_style
        )
        return query, key

    forward_cpu = forward_oot


class KunlunSiluAndMul(SiluAndMul):
    def forward_oot(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(x)

    forward_cpu = forward_oot


class KunlunGemmaRMSNorm(GemmaRMSNorm):
    """Gemma's convention: the checkpoint stores w and the norm scales by (1 + w), in float32."""

    def forward_oot(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return _normalize(x, residual, self.weight.data.float() + 1.0, self.variance_epsilon)

    forward_cpu = forward_oot


class KunlunGeluAndMul(GeluAndMul):
    def forward_oot(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gelu_and_mul(x, self.approximate)

    forward_cpu = forward_oot


OOT_LAYERS: dict[str, type[CustomOp]] = {
    "RMSNorm": KunlunRMSNorm,
    "GemmaRMSNorm": KunlunGemmaRMSNorm,
    "RotaryEmbedding": KunlunRotaryEmbedding,
    "SiluAndMul": KunlunSiluAndMul,
    "GeluAndMul": KunlunGeluAndMul,
}


def register_layers() -> None:
    """Register the plugin layers with vLLM; safe to call more than once."""
    from vllm.model_executor.custom_op import op_registry_oot

    for vllm_name, layer_cls in OOT_LAYERS.items():
        if op_registry_oot.get(vllm_name) is not layer_cls:
            CustomOp.register_oot(_decorated_op_cls=layer_cls, name=vllm_name)
