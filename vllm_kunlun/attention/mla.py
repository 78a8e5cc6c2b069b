"""The MLA attention backend vLLM runs on the Kunlun platform (DeepSeek-V2/V3 style models).

vLLM's MLAAttention layer owns the projections and the absorbed up-projections (W_UK_T, W_UV);
the backend owns what touches the latent cache, through the plugin's `mla` ops:

- KV write: `concat_and_cache_mla`, one [kv_lora_rank | rope] row per token, shared by the heads;
  the cache is [num_blocks, block_size, L + R].
- Decode (`forward_mqa`): `mla_decode` over the latent rows with the absorbed query.
- Prefill (`forward_mha`): keys and values up-projected from the latent rows by the layer's
  kv_b_proj; the new tokens' causal attention and, for chunked prefill and prefix-cache hits,
  the cached context gathered chunk by chunk (`mla_gather_cache`), each run through the plugin's
  MLA prefill backend (`mla_prefill`) and merged by log-sum-exp (`merge_attention_states`).

vLLM's own context path (`_compute_prefill_context`) calls its CPU or CUDA gather kernels, which
do not exist on a Kunlun XPU, so `forward_mha` is the impl's own.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.model_executor.layers.attention.mla_attention import (
    MLACommonBackend,
    MLACommonDecodeMetadata,
    MLACommonImpl,
    MLACommonMetadata,
    MLACommonMetadataBuilder,
    MLACommonPrefillMetadata,
)
from vllm.v1.attention.backend import (
    AttentionLayer,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)

from vllm_kunlun.ops import mla as mla_ops
from vllm_kunlun.ops.provider import current_provider


@dataclass
class KunlunMLADecodeMetadata(MLACommonDecodeMetadata):
    seq_lens_cpu: torch.Tensor  # host copy of seq_lens (Kunlun kernels take both, KUNLUN.md C3)
    max_seq_len: int


@dataclass
class KunlunMLAMetadata(MLACommonMetadata[KunlunMLADecodeMetadata]):
    def __post_init__(self) -> None:
        """Any latent size: vLLM's check allows only the sizes its CUDA kernels take (320, 512,
        576); the plugin's reference kernels take any, and the Kunlun provider checks its own
        at start-up."""


class KunlunMLAMetadataBuilder(MLACommonMetadataBuilder[KunlunMLAMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device,
                         metadata_cls=KunlunMLAMetadata)  # fmt: skip
        self._seq_lens_cpu: torch.Tensor | None = None

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> KunlunMLAMetadata:
        cm = common_attn_metadata
        seq_lens_cpu = cm.seq_lens_cpu_upper_bound
        self._seq_lens_cpu = seq_lens_cpu if seq_lens_cpu is not None else cm.seq_lens.cpu()
        return super().build(common_prefix_len, cm, fast_build)

    def _build_decode(
        self,
        block_table_tensor: torch.Tensor,
        seq_lens_device: torch.Tensor,
        max_seq_len: int,
        query_start_loc_cpu: torch.Tensor,
        query_start_loc_device: torch.Tensor,
        num_decode_tokens: int,
        max_query_len: int,
        dcp_tot_seq_lens_device: torch.Tensor | None,
    ) -> KunlunMLADecodeMetadata:
        assert self._seq_lens_cpu is not None
        num_decodes = seq_lens_device.shape[0]
        seq_lens_cpu = self._seq_lens_cpu[:num_decodes]
        return KunlunMLADecodeMetadata(
            block_table=block_table_tensor,
            seq_lens=seq_lens_device,
            dcp_tot_seq_lens=dcp_tot_seq_lens_device,
            seq_lens_cpu=seq_lens_cpu,
            max_seq_len=int(seq_lens_cpu.max()),
        )


class KunlunMLABackend(MLACommonBackend):
    accept_output_buffer = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16", "float32"]

    @staticmethod
    def get_name() -> str:
        return "KUNLUN_MLA"

    @staticmethod
    def get_impl_cls() -> type["KunlunMLAImpl"]:
        return KunlunMLAImpl

    @staticmethod
    def get_builder_cls() -> type[KunlunMLAMetadataBuilder]:
        return KunlunMLAMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any kv_lora_rank + rope dim; the Kunlun provider checks 512 + 64 at start-up


class KunlunMLAImpl(MLACommonImpl[KunlunMLAMetadata]):
    # Decode returns no log-sum-exp (Kunlun's MLA decode kernel writes none), so vLLM must not
    # ask for cross-rank decode merges (decode context parallelism is refused at start-up).
    can_return_lse_for_decode: bool = False

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None,
        attn_type: str,
        kv_sharing_target_layer_name: str | None,
        **mla_args,
    ) -> None:
        unsupported = []
        if alibi_slopes is not None:
            unsupported.append("ALiBi")
        if sliding_window is not None:
            unsupported.append("sliding windows")
        if logits_soft_cap:
            unsupported.append("logit soft-capping")
        if attn_type != AttentionType.DECODER:
            unsupported.append(f"attention type {attn_type!r}")
        if mla_args.get("indexer") is not None:
            unsupported.append("the sparse (top-k indexer) attention of DeepSeek-V3.2")
        if unsupported:
            raise NotImplementedError(
                f"vllm-kunlun's MLA backend does not support {', '.join(unsupported)} yet; "
                "see docs/support-matrix.md for what is supported."
            )
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes,
                         sliding_window, kv_cache_dtype, logits_soft_cap, attn_type,
                         kv_sharing_target_layer_name, **mla_args)  # fmt: skip
        if current_provider().name == "kunlun":
            from vllm_kunlun.ops.mla.kunlun import check_mla_dimensions

            check_mla_dimensions(self.kv_lora_rank, self.qk_rope_head_dim)
        # The decode query reaches forward_mqa unquantized; the plugin fuses no fp8 query.
        self.supports_quant_query_input = False
        self._use_flashinfer_concat_mla_k = False

    def do_kv_cache_update(
        self,
        kv_c_normed: torch.Tensor,
        k_pe: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_cache_dtype: str,
        k_scale: torch.Tensor,
    ) -> None:
        if kv_cache.numel() == 0:  # the profiling run: no cache yet
            return
        num_tokens = slot_mapping.shape[0]
        mla_ops.concat_and_cache_mla(
            kv_c_normed[:num_tokens], k_pe[:num_tokens].flatten(1), kv_cache, slot_mapping
        )

    def forward_mqa(
        self,
        q: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        kv_c_and_k_pe_cache: torch.Tensor,
        attn_metadata: KunlunMLAMetadata,
        layer: AttentionLayer,
    ) -> tuple[torch.Tensor, None]:
        decode = attn_metadata.decode
        assert decode is not None
        query = torch.cat(q, dim=-1) if isinstance(q, tuple) else q
        out = query.new_empty(query.shape[0], self.num_heads, self.kv_lora_rank)
        mla_ops.mla_decode(
            out, query, kv_c_and_k_pe_cache, decode.block_table, decode.seq_lens,
            decode.seq_lens_cpu, decode.max_seq_len, self.kv_lora_rank, self.scale,
        )  # fmt: skip
        return out, None

    def forward_mha(  # type: ignore[override]
        self,
        q: torch.Tensor,
        kv_c_normed: torch.Tensor,
        k_pe: torch.Tensor,
        kv_c_and_k_pe_cache: torch.Tensor,
        attn_metadata: KunlunMLAMetadata,
        k_scale: torch.Tensor,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
    ) -> None:
        if output_scale is not None:
            raise NotImplementedError("vllm-kunlun does not fuse output quantization into MLA.")
        prefill = attn_metadata.prefill
        assert prefill is not None and prefill.prefill_backend is not None
        backend = prefill.prefill_backend
        key, value = self._up_project(kv_c_normed, k_pe)
        out = output.view(-1, self.num_heads, self.v_head_dim)
        if prefill.chunked_context is None:
            backend.run_prefill_new_tokens(q, key, value, return_softmax_lse=False, out=out)
            return
        new_out, new_lse = backend.run_prefill_new_tokens(q, key, value, return_softmax_lse=True)
        context_out, context_lse = self._attend_context(q, kv_c_and_k_pe_cache, prefill)
        mla_ops.merge_attention_states(out, None, context_out, context_lse, new_out, new_lse)

    def _up_project(
        self, kv_c: torch.Tensor, k_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent rows [T, L] and rope keys [T, 1, R] -> per-head keys [T, H, P + R] and values
        [T, H, V], through the layer's kv_b_proj (quantized or not)."""
        kv_nope = self.kv_b_proj(kv_c)[0].view(
            -1, self.num_heads, self.qk_nope_head_dim + self.v_head_dim
        )
        k_nope, value = kv_nope.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        return self._concat_k_nope_k_pe(k_nope, k_pe), value

    def _attend_context(
        self, q: torch.Tensor, kv_cache: torch.Tensor, prefill: MLACommonPrefillMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefill queries' attention over their cached context: outputs [T, H, V] and
        log-sum-exps [H, T] (-inf for a request without context).

        vLLM plans the context in chunks that fit its workspace; each chunk covers a run of
        requests (the token_slice of their queries) and is merged into the running result.
        """
        context = prefill.chunked_context
        assert context is not None and prefill.prefill_backend is not None
        # One chunk covering every query needs no running result to merge into.
        single = len(context.chunks) == 1 and not context.empty_token_slices
        if not single:
            num_tokens = q.shape[0]
            out = q.new_zeros(num_tokens, self.num_heads, self.v_head_dim)
            lse = torch.full((self.num_heads, num_tokens), float("-inf"), device=q.device)
        rank = self.kv_lora_rank
        for chunk in context.chunks:
            rows = context.workspace[: chunk.num_context_tokens]
            mla_ops.mla_gather_cache(
                rows, kv_cache, prefill.block_table[chunk.request_slice], chunk.cu_seq_lens,
                chunk.token_to_seq, chunk.starts,
            )  # fmt: skip
            key, value = self._up_project(rows[:, :rank], rows[:, rank:].unsqueeze(1))
            tokens = chunk.token_slice
            chunk_out, chunk_lse = prefill.prefill_backend.run_prefill_context_chunk(
                chunk=chunk, q=q[tokens], k=key, v=value
            )
            if single:
                return chunk_out, chunk_lse
            merged, merged_lse = torch.empty_like(chunk_out), torch.empty_like(chunk_lse)
            mla_ops.merge_attention_states(merged, merged_lse, out[tokens], lse[:, tokens],
                                           chunk_out, chunk_lse)  # fmt: skip
            out[tokens] = merged
            lse[:, tokens] = merged_lse
        return out, lse
