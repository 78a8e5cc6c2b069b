"""The plugin's MLA prefill backend: what vLLM's MLA layer calls for prefill attention.

Returned by the platform's `get_mla_prefill_backend_cls`; runs the `mla_prefill` op for the new
tokens (causal) and for each cached-context chunk (every context key visible), with the
log-sum-exp the merge needs. Host copies of the offsets (Kunlun kernels take both, KUNLUN.md C3)
are made once per step, when vLLM prepares the metadata.
"""

from typing import ClassVar

import torch
from vllm.model_executor.layers.attention.mla_attention import MLACommonPrefillMetadata
from vllm.v1.attention.backends.mla.prefill.base import MLAPrefillBackend

from vllm_kunlun.ops import mla as mla_ops


class KunlunMLAPrefillBackend(MLAPrefillBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]

    @staticmethod
    def get_name() -> str:
        return "KUNLUN_MLA_PREFILL"

    def supports_out(self) -> bool:
        return True

    def prepare_metadata(self, prefill_metadata: MLACommonPrefillMetadata) -> None:
        super().prepare_metadata(prefill_metadata)
        lens = prefill_metadata.query_lens_cpu
        assert lens is not None
        self._query_start_loc_cpu = torch.nn.functional.pad(lens.cumsum(0), (1, 0))
        self._chunk_offsets_cpu: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        context = prefill_metadata.chunked_context
        for chunk in context.chunks if context is not None else ():
            self._chunk_offsets_cpu[chunk.index] = (
                chunk.query_start_loc.cpu(),
                chunk.cu_seq_lens.cpu(),
            )

    def run_prefill_new_tokens(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        return_softmax_lse: bool,
        out: torch.Tensor | None = None,
        output_scale: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if output_scale is not None:
            raise NotImplementedError("vllm-kunlun does not fuse output quantization into MLA.")
        meta = self._prefill_metadata
        out, lse = self._outputs(q, v, out, return_softmax_lse)
        offsets_cpu = self._query_start_loc_cpu
        mla_ops.mla_prefill(
            out, lse, q, k, v, meta.query_start_loc, offsets_cpu, meta.query_start_loc,
            offsets_cpu, meta.max_query_len, meta.max_query_len, self.scale, True,
        )  # fmt: skip
        return (out, lse) if lse is not None else out

    def run_prefill_context_chunk(
        self,
        chunk: MLACommonPrefillMetadata.ContextChunk,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = self._outputs(q, v, out, True)
        assert lse is not None
        query_offsets_cpu, key_offsets_cpu = self._chunk_offsets_cpu[chunk.index]
        mla_ops.mla_prefill(
            out, lse, q, k, v, chunk.query_start_loc, query_offsets_cpu, chunk.cu_seq_lens,
            key_offsets_cpu, chunk.max_query_len, chunk.max_seq_len, self.scale, False,
        )  # fmt: skip
        return out, lse

    def _outputs(
        self, q: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None, with_lse: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        num_tokens, heads = q.shape[0], q.shape[1]
        if out is None:
            out = q.new_empty(num_tokens, heads, v.shape[-1])
        if not with_lse:
            return out, None
        return out, torch.empty(heads, num_tokens, dtype=torch.float32, device=q.device)
