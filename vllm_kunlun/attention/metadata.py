"""Per-step attention metadata: built once per step, shared by every layer of the step.

The batch arrives reordered by vLLM (decodes first, see `reorder_batch_threshold`), so the
decode and prefill parts are contiguous slices. Host ("_cpu") copies sit next to the device
tensors because Kunlun kernels take both (KUNLUN.md C3); on the emulated device they are the
same memory.
"""

from dataclasses import dataclass

import torch
from vllm.config import VllmConfig
from vllm.v1.attention.backend import AttentionMetadataBuilder, CommonAttentionMetadata
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.kv_cache_interface import AttentionSpec


@dataclass
class DecodeMetadata:
    block_table: torch.Tensor  # [R, max_blocks] int32
    seq_lens: torch.Tensor  # [R], context including the new token
    seq_lens_cpu: torch.Tensor
    max_seq_len: int


@dataclass
class PrefillMetadata:
    block_table: torch.Tensor
    query_start_loc: torch.Tensor  # [R + 1], rebased to start at 0
    query_start_loc_cpu: torch.Tensor
    seq_lens: torch.Tensor
    seq_start_loc: torch.Tensor  # [R + 1] cumulative seq_lens (Kunlun's kv "lod")
    seq_start_loc_cpu: torch.Tensor
    max_query_len: int
    max_seq_len: int


@dataclass
class KunlunAttentionMetadata:
    num_actual_tokens: int
    num_decode_tokens: int
    slot_mapping: torch.Tensor
    decode: DecodeMetadata | None
    prefill: PrefillMetadata | None


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


class KunlunAttentionMetadataBuilder(AttentionMetadataBuilder[KunlunAttentionMetadata]):
    reorder_batch_threshold = 1

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> KunlunAttentionMetadata:
        cm = common_attn_metadata
        if isinstance(cm.causal, torch.Tensor):
            raise NotImplementedError(
                "vllm-kunlun's attention backend does not support per-request causal masks "
                "(dynamic causality) yet; see docs/support-matrix.md for what is supported."
            )
        if cm.causal:
            num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(
                cm, decode_threshold=1
            )
        else:  # encoder-only: every request is a whole sequence, even a one-token one
            num_decodes, num_prefills, num_decode_tokens = 0, cm.num_reqs, 0
        num_reqs = cm.num_reqs
        seq_lens_cpu = cm.seq_lens_cpu_upper_bound
        if seq_lens_cpu is None:
            seq_lens_cpu = cm.seq_lens.cpu()
        seq_lens_cpu = seq_lens_cpu[:num_reqs]
        block_table = cm.block_table_tensor[:num_reqs]
        seq_lens = cm.seq_lens[:num_reqs]

        decode = None
        if num_decodes:
            decode_lens_cpu = seq_lens_cpu[:num_decodes]
            decode = DecodeMetadata(
                block_table=block_table[:num_decodes],
                seq_lens=seq_lens[:num_decodes],
                seq_lens_cpu=decode_lens_cpu,
                max_seq_len=int(decode_lens_cpu.max()),
            )

        prefill = None
        if num_prefills:
            start = num_decodes
            qsl_cpu = cm.query_start_loc_cpu[start : num_reqs + 1]
            qsl_cpu = qsl_cpu - qsl_cpu[0]
            prefill_lens_cpu = seq_lens_cpu[start:]
            seq_start_loc_cpu = _cumulative(prefill_lens_cpu)
            qsl = cm.query_start_loc[start : num_reqs + 1]
            prefill = PrefillMetadata(
                block_table=block_table[start:],
                query_start_loc=qsl - qsl[:1],
                query_start_loc_cpu=qsl_cpu,
                seq_lens=seq_lens[start:],
                seq_start_loc=seq_start_loc_cpu.to(self.device, non_blocking=True),
                seq_start_loc_cpu=seq_start_loc_cpu,
                max_query_len=int((qsl_cpu[1:] - qsl_cpu[:-1]).max()),
                max_seq_len=int(prefill_lens_cpu.max()),
            )

        return KunlunAttentionMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            num_decode_tokens=num_decode_tokens,
            slot_mapping=cm.slot_mapping[: cm.num_actual_tokens],
            decode=decode,
            prefill=prefill,
        )
