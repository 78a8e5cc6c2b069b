"""The attention backend vLLM runs on the Kunlun platform.

KV-cache layout: vLLM gives each layer a [num_blocks, Hkv, block_size, 2 * D] tensor (logical
layout LBHNC). The plugin reads every block as [2, Hkv, block_size, D]: the block's K page, then
its V page, each head-major ("BHLD", the layout Kunlun kernels use). `split_kv_cache` returns
the two [num_blocks, Hkv, block_size, D] views.
"""

from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionLayer,
    AttentionType,
    MultipleOf,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from vllm_kunlun.attention.metadata import (
    KunlunAttentionMetadata,
    KunlunAttentionMetadataBuilder,
)
from vllm_kunlun.ops import attention as attention_ops
from vllm_kunlun.ops import kv_cache as kv_cache_ops

#: Decoder self-attention over the paged cache, and encoder-only (bidirectional, cache-free)
#: attention for embedding models such as BERT.
SUPPORTED_ATTENTION_TYPES = (AttentionType.DECODER, AttentionType.ENCODER_ONLY)


def split_kv_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[num_blocks, Hkv, block_size, 2 * D] -> K and V caches, each [num_blocks, Hkv, bs, D]."""
    num_blocks, kv_heads, block_size, two_d = kv_cache.shape
    if not kv_cache.is_contiguous():
        raise RuntimeError(
            "vllm-kunlun expects each layer's KV cache to be contiguous (layout LBHNC); got "
            f"strides {kv_cache.stride()}. Unset VLLM_KV_CACHE_LAYOUT or set it to LBHNC."
        )
    pages = kv_cache.view(num_blocks, 2, kv_heads, block_size, two_d // 2)
    return pages[:, 0], pages[:, 1]


class KunlunAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update = False
    accept_output_buffer = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16", "float32"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type["KunlunAttentionImpl"]:
        return KunlunAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KunlunAttentionMetadataBuilder]:
        return KunlunAttentionMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        # The head sizes Kunlun's attention kernels accept (KUNLUN.md §3.4).
        return [32, 64, 80, 96, 112, 120, 128, 192, 256, 512]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_non_causal(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type in SUPPORTED_ATTENTION_TYPES


class KunlunAttentionImpl(AttentionImpl[KunlunAttentionMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        unsupported = []
        if alibi_slopes is not None:
            unsupported.append("ALiBi")
        if sinks is not None:
            unsupported.append("attention sinks")
        if attn_type not in SUPPORTED_ATTENTION_TYPES:
            unsupported.append(f"attention type {attn_type!r}")
        elif attn_type == AttentionType.ENCODER_ONLY and (sliding_window or logits_soft_cap):
            unsupported.append("sliding windows or soft-capping in encoder-only attention")
        if unsupported:
            raise NotImplementedError(
                f"vllm-kunlun's attention backend does not support {', '.join(unsupported)} "
                "yet; see docs/support-matrix.md for what is supported."
            )
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.sliding_window = sliding_window or -1
        self.logits_soft_cap = float(logits_soft_cap or 0.0)
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.attn_type = attn_type
        from vllm.config import get_current_vllm_config

        self.max_model_len = get_current_vllm_config().model_config.max_model_len

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        if self.attn_type == AttentionType.ENCODER_ONLY:
            return  # encoder-only layers keep no cache (vLLM still hands them a slot mapping)
        key_cache, value_cache = split_kv_cache(kv_cache)
        num_tokens = slot_mapping.shape[0]
        kv_cache_ops.reshape_and_cache(
            key[:num_tokens], value[:num_tokens], key_cache, value_cache, slot_mapping
        )

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: KunlunAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(
                "vllm-kunlun does not fuse output quantization into attention."
            )
        if attn_metadata is None:  # profiling run: no KV cache yet
            return output.fill_(0)

        out = output.view(-1, self.num_heads, self.head_size)
        q = query.view(-1, self.num_heads, self.head_size)
        if self.attn_type == AttentionType.ENCODER_ONLY:
            return self._encoder_forward(out, q, key, value, attn_metadata, output)

        key_cache, value_cache = split_kv_cache(kv_cache)
        split = attn_metadata.num_decode_tokens
        end = attn_metadata.num_actual_tokens
        common = dict(scale=self.scale, sliding_window=self.sliding_window,
                      softcap=self.logits_soft_cap)  # fmt: skip

        if (d := attn_metadata.decode) is not None:
            attention_ops.decode_attention(
                out[:split], q[:split], key_cache, value_cache, d.block_table, d.seq_lens,
                d.seq_lens_cpu, d.max_seq_len, self.max_model_len, **common,
            )  # fmt: skip
        if (p := attn_metadata.prefill) is not None:
            attention_ops.prefill_attention(
                out[split:end], q[split:end], key_cache, value_cache, p.block_table,
                p.query_start_loc, p.query_start_loc_cpu, p.seq_lens, p.seq_start_loc,
                p.seq_start_loc_cpu, p.max_query_len, p.max_seq_len, **common,
            )  # fmt: skip
        return output

    def _encoder_forward(
        self,
        out: torch.Tensor,
        q: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_metadata: KunlunAttentionMetadata,
        output: torch.Tensor,
    ) -> torch.Tensor:
        """Encoder-only layers: the step's tokens attend within their own sequence, no cache."""
        end = attn_metadata.num_actual_tokens
        p = attn_metadata.prefill
        if p is None:
            return output
        k = key.view(-1, self.num_kv_heads, self.head_size)[:end]
        v = value.view(-1, self.num_kv_heads, self.head_size)[:end]
        attention_ops.encoder_attention(
            out[:end], q[:end], k, v, p.query_start_loc, p.query_start_loc_cpu,
            p.max_query_len, self.scale,
        )  # fmt: skip
        return output
