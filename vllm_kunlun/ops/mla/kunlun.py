"""Kunlun binding of the MLA family (KUNLUN.md §2d "MLA-specific kernels", the MLA forms of
`paged_attention` and `attention`, `attention_merge_stage`, the MLA KV-cache layout, §3.4).
Needs a Kunlun XPU; contract-tested only, against the stand-in library (tests/standin). Every
tensor a kernel reads is made contiguous (C1), outputs are preallocated (C2), lengths and lods
go as int32 host and device copies (C3, C5).

- concat_and_cache_mla: `concat_and_cache_mla(kv_c, k_pe, slot_mapping, kv_cache)`, the recorded
  positional order (the recorded `_C::concat_and_cache_mla` wrapper takes (kv_c, k_pe,
  kv_cache, slot_mapping) but forwards by keyword). kv_c [T, 512] and k_pe [T, 64] in the
  cache's dtype, the cache [num_blocks, block_size, 576], slot_mapping as vLLM gives it (no
  cast, as recorded for both cache writes, C5). Whether the kernel skips negative (padding)
  slots is unknown (§4.5 asks the same of reshape_and_cache_flash): like the kv_cache binding
  and the recorded plugin, the binding passes them unchanged and assumes the kernel skips them.
- mla_decode: the MLA positional form of `paged_attention`: (out, q, k_cache, None,
  block_table, context_lens_cpu, context_lens_xpu, False, True, -1, kv_lora_rank,
  qk_rope_head_dim, softmax_scale, q_r=q), with q viewed [B, 1, H, 576], the cache viewed
  [num_blocks, 1, block_size, 576], out [B, 1, H, 512] preallocated (the op's out, or a scratch
  copied back), an int32 block table, and per-request sequence lengths (not cumulative: the
  recorded MLA metadata passes seq_lens.cpu() and seq_lens) as int32 host and device copies.
  is_causal=True as the recorded FlashMLA decode passes it (one query per request sees its whole
  sequence either way). Inferred: that q_r=q makes the kernel read the rope part from q's last
  64 columns; the argument names and order themselves (KUNLUN.md notes that the keyword form
  (x=, ..., out=) disagrees with this form, §4.1: the MLA positional form is followed, and
  `prepare` checks that the installed function takes 13 positional arguments and q_r).
  max_seq_len has no kernel parameter. No LSE is returned (none is recorded, none is needed).
- mla_gather_cache: no recorded kunlun_ops kernel (KUNLUN.md records only
  `xspeedgate_ops.gather_and_maybe_dequant_cache`, another library, not bound here), so it runs
  the reference's PyTorch ops on the XPU.
- mla_prefill, causal with query lods equal to key lods (the new tokens' attention): the MLA
  prefill form of `attention` (keywords, as recorded): q, k, v [T, H, Dqk], V zero-padded from
  Dv to Dqk, out [T, H, Dqk] (a scratch, sliced to Dv), softmax_lse float32 [H, T] preallocated
  with -inf (the op's lse when it is contiguous float32, else a scratch), the one lod pair
  context_seq_lod_cpu/xpu. The recorded call hard-codes alpha = 1.8738542070926265 (DeepSeek-V3's
  YaRN mscale^2); the binding passes alpha = scale * sqrt(Dqk), which is that value for
  DeepSeek-V3 (scale = mscale^2 / sqrt(192)) and assumes, as for prefill_attention (§2d), that
  the kernel applies 1/sqrt(head_dim) itself and then multiplies by alpha (inferred). The LSE is
  assumed natural-log (stated only for sparse prefill, §4.9) and [H, T] (the recorded caller's
  allocation). Whether the kernel needs Dv = Dqk or only ignores the padding is not recorded.
- mla_prefill otherwise runs the reference's PyTorch ops on the XPU. The recorded form has one
  lod pair for queries and keys; for context chunks (causal=False, queries over another request
  split of keys) the recorded plugin passes query_start_loc as context_seq_lod_xpu and the
  chunk's cu_seq_lens_cpu as context_seq_lod_cpu, a pairing KUNLUN.md flags ("check this
  pairing") and that cannot describe both splits. The choice is made on the host from the
  causal flag and the *_cpu lods (no device sync), so it is per call. Also the reference: keys
  or values with other head counts than the queries, Dv > Dqk. (An unmerged upstream change,
  baidu/vLLM-Kunlun PR #354, passes context_kvlen_lod_cpu/xpu keywords for the key split of
  context chunks; KUNLUN.md does not record them, so they are not used.)
- merge_attention_states: `attention_merge_stage(prefix_output, prefix_lse, suffix_output,
  suffix_lse, output, output_lse)`, positional, output after the inputs (vLLM's
  merge_attn_states takes output first). LSEs float32 in the op's [H, T] layout: the layout the
  kernel expects is inferred (§4.9); the same unmerged PR #354 says the kernel takes [T, H] and
  transposes around the call, against the recorded main, which passes attention's [H, T]
  softmax_lse straight through: check this first on hardware. output_lse is always a tensor: a
  float32 [H, T] scratch when the op's out_lse is None (whether the kernel accepts None is not
  recorded).
- Dimensions: the recorded MLA kernels are only seen with kv_lora_rank 512 and rope dim 64
  (576-wide cache rows; §3.4 lists 576 as MLA's head size). `check_mla_dimensions` refuses other
  models at start-up; concat_and_cache_mla and mla_decode raise NotImplementedError for other
  sizes (check-kernels reports that as unsupported).
- dtypes: the recorded dense MLA cache is fp16 or bf16; that the kernels also take float32 is
  assumed (the contract tests run all three).
- Host copies (C3) are read at kernel launch (§3.2, inferred): a captured graph would freeze
  them, so MLA attention must stay a splitting op of piecewise graphs.
- Zero tokens or zero requests call no kernel.
"""

import math

import torch
import torch.nn.functional as F

from vllm_kunlun.ops.kunlun_library import (
    attention_alpha,
    check_keywords,
    dense,
    function,
    int32,
    library,
    parameters,
    write_back,
)
from vllm_kunlun.ops.mla import reference

#: The only latent sizes the recorded MLA kernels are seen with (DeepSeek-V2/V3).
KV_LORA_RANK = 512
ROPE_HEAD_DIM = 64

KEYWORDS = {
    "concat_and_cache_mla": (),
    "paged_attention": ("q_r",),
    "attention": (
        "q", "k_cache", "v_cache", "out", "is_causal", "is_prefill", "context_seq_lod_cpu",
        "context_seq_lod_xpu", "prefill_len", "k_perchannel_scale", "v_perchannel_scale",
        "smooth", "slot_mapping_cpu", "slot_mapping_xpu", "v_trans", "v_trans_threshold",
        "alpha", "softmax_lse",
    ),
    "attention_merge_stage": (),
}  # fmt: skip
#: Positional arguments the binding passes, per function (the recorded positional forms).
POSITIONAL = {"concat_and_cache_mla": 4, "paged_attention": 13, "attention_merge_stage": 6}


def _positional_capacity(name: str) -> float:
    params = parameters(function(name))
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return math.inf
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def prepare() -> None:
    check_keywords(KEYWORDS)
    short = [f"kunlun_ops.{name} takes {capacity} positional arguments, the binding passes {n}"
             for name, n in POSITIONAL.items()
             if (capacity := _positional_capacity(name)) < n]  # fmt: skip
    if short:
        raise RuntimeError(
            "The installed kunlun_ops does not match the MLA call forms vllm-kunlun was written "
            f"against (KUNLUN.md §2d): {'; '.join(short)}. Update vllm_kunlun/ops/mla/kunlun.py "
            "for this build, or set VLLM_KUNLUN_KERNELS=reference."
        )


def _dimension_problem(kv_lora_rank: int, qk_rope_head_dim: int) -> str | None:
    if (kv_lora_rank, qk_rope_head_dim) == (KV_LORA_RANK, ROPE_HEAD_DIM):
        return None
    return (
        f"this model's MLA has kv_lora_rank {kv_lora_rank} and rope dim {qk_rope_head_dim}, but "
        f"the recorded Kunlun MLA kernels take kv_lora_rank {KV_LORA_RANK} and rope dim "
        f"{ROPE_HEAD_DIM} only (576-wide cache rows, DeepSeek-V2/V3); use "
        "VLLM_KUNLUN_KERNELS=reference to run it with the reference kernels."
    )


def check_mla_dimensions(kv_lora_rank: int, qk_rope_head_dim: int) -> None:
    """Start-up check: ValueError unless the model's latent sizes are the recorded 512 + 64."""
    problem = _dimension_problem(kv_lora_rank, qk_rope_head_dim)
    if problem is not None:
        raise ValueError(f"vllm-kunlun: {problem}")


def _recorded_dimensions(kv_lora_rank: int, qk_rope_head_dim: int) -> None:
    problem = _dimension_problem(kv_lora_rank, qk_rope_head_dim)
    if problem is not None:
        raise NotImplementedError(f"vllm-kunlun's Kunlun binding: {problem}")


def _output_buffer(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` itself when a kernel can write it (contiguous, `dtype`), else a scratch to copy back."""
    if t.is_contiguous() and t.dtype == dtype:
        return t
    return torch.empty(t.shape, dtype=dtype, device=t.device)


def concat_and_cache_mla(
    kv_c: torch.Tensor,
    k_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    _recorded_dimensions(kv_c.shape[-1], k_pe.shape[-1])
    if slot_mapping.numel() == 0:
        return
    cache = dense(kv_cache)
    # Recorded positional order (kv_c, k_pe, slot_mapping, kv_cache); the op's (and the
    # recorded _C wrapper's) order is (kv_c, k_pe, kv_cache, slot_mapping).
    library().concat_and_cache_mla(
        dense(kv_c.to(cache.dtype)), dense(k_pe.to(cache.dtype)), dense(slot_mapping), cache
    )
    write_back(kv_cache, cache)


def mla_decode(
    out: torch.Tensor,
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    seq_lens_cpu: torch.Tensor,
    max_seq_len: int,
    kv_lora_rank: int,
    scale: float,
) -> None:
    rope_dim = query.shape[-1] - kv_lora_rank
    _recorded_dimensions(kv_lora_rank, rope_dim)
    if query.shape[0] == 0:
        return
    cache = dense(kv_cache)
    q = dense(query.to(cache.dtype)).unsqueeze(1)  # [B, 1, H, L + R]
    dst = _output_buffer(out, cache.dtype)
    library().paged_attention(
        dst.unsqueeze(1),  # out [B, 1, H, L]
        q,
        cache.unsqueeze(1),  # k_cache [num_blocks, 1, block_size, L + R]
        None,  # v_cache: the latent rows are the values
        int32(block_table),
        int32(seq_lens_cpu),  # context_lens_cpu: per-request lengths
        int32(seq_lens),  # context_lens_xpu
        False,  # is_context
        True,  # is_causal
        -1,  # vo_head_dim
        kv_lora_rank,
        rope_dim,  # qk_rope_head_dim
        float(scale),  # softmax_scale
        q_r=q,
    )
    write_back(out, dst)


# No recorded kunlun_ops kernel: KUNLUN.md records xspeedgate_ops.gather_and_maybe_dequant_cache,
# which this plugin does not bind, so the reference's PyTorch ops run on the XPU.
mla_gather_cache = reference.mla_gather_cache


def _one_lod_pair(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_start_loc_cpu: torch.Tensor,
    key_start_loc_cpu: torch.Tensor,
    causal: bool,
) -> bool:
    """Whether the recorded prefill form (one lod for queries and keys) describes the call:
    causal attention of the new tokens over themselves. Decided on the host: the *_cpu lods."""
    return (
        causal
        and key.shape == query.shape
        and value.shape[:2] == query.shape[:2]
        and value.shape[-1] <= query.shape[-1]
        # Host tensors: comparing their values waits for no device (C3).
        and query_start_loc_cpu.tolist() == key_start_loc_cpu.tolist()
    )


def mla_prefill(
    out: torch.Tensor,
    lse: torch.Tensor | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_start_loc: torch.Tensor,
    query_start_loc_cpu: torch.Tensor,
    key_start_loc: torch.Tensor,
    key_start_loc_cpu: torch.Tensor,
    max_query_len: int,
    max_key_len: int,
    scale: float,
    causal: bool,
) -> None:
    if not _one_lod_pair(query, key, value, query_start_loc_cpu, key_start_loc_cpu, causal):
        # Context chunks (and anything else one lod pair cannot describe): the recorded pairing
        # is inconsistent (KUNLUN.md: "check this pairing"), so the reference runs on the XPU.
        reference.mla_prefill(out, lse, query, key, value, query_start_loc, query_start_loc_cpu,
                              key_start_loc, key_start_loc_cpu, max_query_len, max_key_len,
                              scale, causal)  # fmt: skip
        return
    num_tokens, heads, qk_dim = query.shape
    if num_tokens == 0:
        return
    dtype = query.dtype
    v_dim = value.shape[-1]
    v = value.to(dtype)
    v = dense(v) if v_dim == qk_dim else F.pad(v, (0, qk_dim - v_dim))  # zero-padded to Dqk
    attn_out = torch.empty(num_tokens, heads, qk_dim, dtype=dtype, device=query.device)
    if lse is not None and lse.is_contiguous() and lse.dtype == torch.float32:
        softmax_lse = lse.fill_(float("-inf"))
    else:
        softmax_lse = torch.full((heads, num_tokens), float("-inf"), dtype=torch.float32,
                                 device=query.device)  # fmt: skip
    library().attention(
        q=dense(query),
        k_cache=dense(key.to(dtype)),
        v_cache=v,
        out=attn_out,
        is_causal=True,
        is_prefill=True,
        context_seq_lod_cpu=int32(query_start_loc_cpu),
        context_seq_lod_xpu=int32(query_start_loc),
        prefill_len=0,
        k_perchannel_scale=None,
        v_perchannel_scale=None,
        smooth=None,
        slot_mapping_cpu=None,
        slot_mapping_xpu=None,
        v_trans=False,
        v_trans_threshold=0,
        alpha=attention_alpha(float(scale), qk_dim),
        softmax_lse=softmax_lse,
    )
    out.copy_(attn_out[..., :v_dim])
    if lse is not None:
        write_back(lse, softmax_lse)


def merge_attention_states(
    out: torch.Tensor,
    out_lse: torch.Tensor | None,
    prefix_out: torch.Tensor,
    prefix_lse: torch.Tensor,
    suffix_out: torch.Tensor,
    suffix_lse: torch.Tensor,
) -> None:
    num_tokens, heads = out.shape[:2]
    if num_tokens == 0:
        return
    dst = _output_buffer(out, out.dtype)
    if out_lse is None:
        dst_lse = torch.empty(heads, num_tokens, dtype=torch.float32, device=out.device)
    else:
        dst_lse = _output_buffer(out_lse, torch.float32)
    library().attention_merge_stage(
        dense(prefix_out.to(out.dtype)),
        dense(prefix_lse.float()),  # [H, T] (inferred layout)
        dense(suffix_out.to(out.dtype)),
        dense(suffix_lse.float()),
        dst,  # output, after the inputs
        dst_lse,  # output_lse
    )
    write_back(out, dst)
    if out_lse is not None:
        write_back(out_lse, dst_lse)
