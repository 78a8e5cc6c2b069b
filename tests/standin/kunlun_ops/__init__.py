"""A stand-in for the Kunlun kernel library `kunlun_ops`, for tests only (put tests/standin on
PYTHONPATH to make `import kunlun_ops` find it).

Each function has the call form KUNLUN.md records for kunlun_ops 0.1.58 (positional-only and
keyword-only parameters where the recorded call sites pass them that way) and checks every call
against the recorded contract: argument names and order, dtypes (int32 lods, block tables and
lengths), contiguity of every tensor (C1), shapes and layouts, host copies next to device tensors
(C3), outputs preallocated by the caller (C2). A violation raises AssertionError. The result is
then computed with the op families' reference kernels (vllm_kunlun/ops/<family>/reference.py),
reading the caches the way the kernels are inferred to: block id b is page b of the contiguous
cache tensor that was passed, whatever else that memory belongs to.

Where KUNLUN.md records no behaviour, the stand-in assumes vLLM's: swiglu gates the first half,
negative slots are skipped (by both cache writes), a sliding window of w covers w keys including
the current one, the Gemma norms compute in float32 and round once (vLLM's GemmaRMSNorm). The MLA
kernels are assumed to behave as vllm_kunlun/ops/mla/kunlun.py infers: `attention` scales scores
by alpha / sqrt(head_dim) and writes a natural-log softmax_lse [H, T], `attention_merge_stage`
takes and writes LSEs [H, T].

KUNLUN_STANDIN_FORM=active|legacy (read at import) selects which recorded signature of rmsnorm and
add_rmsnorm this module exposes. Calls are counted in CALLS; with KUNLUN_STANDIN_CALLS=<dir> each
process writes its counts to <dir>/calls-<pid>.json at exit, and when write_calls is called
(tests/generate.py asks engine workers to, before shutdown: a worker that does not stop within
vLLM's shutdown timeout is killed and never reaches its exit hook).
"""

import atexit
import functools
import inspect
import json
import math
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from vllm_kunlun.ops.activation import reference as activation
from vllm_kunlun.ops.attention import reference as dense_attention
from vllm_kunlun.ops.kv_cache import reference as kv_cache
from vllm_kunlun.ops.mla import reference as mla
from vllm_kunlun.ops.norm import reference as norm
from vllm_kunlun.ops.quant import reference as quant
from vllm_kunlun.ops.rotary import reference as rotary

__version__ = "0.1.58+standin"
FORM = os.environ.get("KUNLUN_STANDIN_FORM", "active")
if FORM not in ("active", "legacy"):
    raise ValueError(f"KUNLUN_STANDIN_FORM={FORM!r} is not 'active' or 'legacy'")

CALLS: Counter[str] = Counter()
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def write_calls(_worker: object = None) -> str | None:
    """Write this process's counts to $KUNLUN_STANDIN_CALLS/calls-<pid>.json; the path, or None.

    `_worker` lets `LLM.collective_rpc(write_calls)` call it on each worker."""
    directory = os.environ.get("KUNLUN_STANDIN_CALLS")
    if not (directory and CALLS):
        return None
    path = Path(directory) / f"calls-{os.getpid()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(CALLS)))
    return str(path)


atexit.register(write_calls)


def _kernel(fn: Callable) -> Callable:
    """Check the call form against `fn`'s recorded signature, count the call, run `fn`."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        try:
            signature.bind(*args, **kwargs)
        except TypeError as error:
            raise AssertionError(
                f"kunlun_ops.{checked.__name__}: call does not match the recorded form "
                f"{checked.__name__}{signature}: {error}"
            ) from None
        CALLS[checked.__name__] += 1
        return fn(*args, **kwargs)

    return checked


# Contract checks ---------------------------------------------------------------------------


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(f"kunlun_ops stand-in: {message}")


def _tensor(name: str, t: object, ndim: int | None = None) -> torch.Tensor:
    _expect(isinstance(t, torch.Tensor), f"{name} must be a tensor, got {type(t).__name__}")
    _expect(t.is_contiguous(), f"{name} must be contiguous (C1), got strides {t.stride()}")
    if ndim is not None:
        _expect(t.dim() == ndim, f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def _floating(name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    _expect(t.dtype in FLOAT_DTYPES, f"{name} must be fp32/fp16/bf16, got {t.dtype}")
    if dtype is not None:
        _expect(t.dtype == dtype, f"{name} must be {dtype}, got {t.dtype}")


def _int32(name: str, t: torch.Tensor) -> None:
    _expect(t.dtype == torch.int32, f"{name} must be int32 (C5), got {t.dtype}")


def _output(name: str, out: object, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    _tensor(name, out)
    _expect(tuple(out.shape) == shape, f"{name} must be preallocated as {shape}, got {out.shape}")
    _expect(out.dtype == like.dtype, f"{name} must have dtype {like.dtype}, got {out.dtype}")
    return out


def _host_and_device(name: str, cpu: object, xpu: object, ndim: int = 1) -> torch.Tensor:
    """A C3 pair: the same int32 values as a host tensor and as a device tensor."""
    _tensor(f"{name}_cpu", cpu, ndim)
    _tensor(f"{name}_xpu", xpu, ndim)
    _int32(f"{name}_cpu", cpu)
    _int32(f"{name}_xpu", xpu)
    _expect(cpu.device.type == "cpu", f"{name}_cpu must be a host tensor, got {cpu.device}")
    _expect(torch.equal(cpu, xpu.cpu()), f"{name}_cpu and {name}_xpu hold different values")
    return cpu


def _lod(name: str, cpu: object, xpu: object, batch: int) -> torch.Tensor:
    lod = _host_and_device(name, cpu, xpu)
    _expect(lod.numel() == batch + 1, f"{name} must have batch+1={batch + 1} entries")
    _expect(lod[0] == 0 and bool((lod.diff() >= 0).all()), f"{name} must be a lod [0, ...]")
    return lod


def _paged_cache(name: str, cache: object, like: torch.Tensor) -> torch.Tensor:
    _tensor(name, cache, 4)  # [blocks, Hkv, block_size, D] (BHLD)
    _expect(cache.dtype == like.dtype, f"{name} must have dtype {like.dtype}, got {cache.dtype}")
    _expect(cache.shape[-1] == like.shape[-1], f"{name} head dim must be {like.shape[-1]}")
    return cache


def _used_blocks(
    block_table: object, lens: torch.Tensor, block_size: int, caches: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """Block ids the requests read are pages of every cache; unused entries are zeroed."""
    _tensor("block_table", block_table, 2)
    _int32("block_table", block_table)
    _expect(block_table.shape[0] == lens.numel(), "block_table must have one row per request")
    needed = (lens.long() + block_size - 1) // block_size
    _expect(int(needed.max()) <= block_table.shape[1], "block_table has too few columns")
    used = torch.arange(block_table.shape[1]) < needed.cpu()[:, None]
    ids = block_table.cpu()[used]
    for cache in caches:
        in_range = bool(((ids >= 0) & (ids < cache.shape[0])).all())
        _expect(in_range, f"block ids out of range for a cache of {cache.shape[0]} blocks")
    return block_table.masked_fill(~used.to(block_table.device), 0)


def _window(name: str, window: int) -> int:
    _expect(isinstance(window, int) and (window == -1 or window > 0),
            f"{name} must be -1 (none) or a positive window, got {window!r}")  # fmt: skip
    return window


def _not_modeled(name: str, value: object) -> None:
    _expect(value is None, f"{name} is not modeled by the stand-in; the plugin passes None")


# Norms -------------------------------------------------------------------------------------


def _norm_args(x: object, weight: object, weight_dtype: torch.dtype | None) -> None:
    _tensor("x", x)
    _floating("x", x)
    _tensor("weight", weight, 1)
    _expect(weight.numel() == x.shape[-1], "weight must be [hidden]")
    _floating("weight", weight, weight_dtype or x.dtype)


def _rms_norm_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    out.copy_(norm.rms_norm(x, weight, eps))


@_kernel
def _rmsnorm_active(x, weight, output, eps, /) -> None:
    """(x, weight, output, eps): weight in the model dtype (active path, §2a)."""
    _norm_args(x, weight, None)
    _rms_norm_into(_output("output", output, x, tuple(x.shape)), x, weight, eps)


@_kernel
def _rmsnorm_legacy(x, weight, eps, /, *, out) -> None:
    """(x, weight_fp32, eps, out=): the legacy path cast the weight to fp32 (§2a)."""
    _norm_args(x, weight, torch.float32)
    _rms_norm_into(_output("out", out, x, tuple(x.shape)), x, weight, eps)


@_kernel
def _add_rmsnorm_active(x, residual, /, *, residual_output, weight, eps, output) -> None:
    """output = norm(x + residual) * weight, residual_output = x + residual; may alias x/r."""
    _norm_args(x, weight, None)
    _tensor("residual", residual)
    _expect(residual.shape == x.shape and residual.dtype == x.dtype, "residual must match x")
    total = x + residual  # read everything before writing: outputs may alias the inputs
    normed = norm.rms_norm(total, weight, eps)
    _output("residual_output", residual_output, x, tuple(x.shape)).copy_(total)
    _output("output", output, x, tuple(x.shape)).copy_(normed)


@_kernel
def _add_rmsnorm_legacy(x, residual, weight, eps, /, *, out) -> None:
    """out = norm(x + residual) * weight_fp32; the caller keeps the sum itself (§2a)."""
    _norm_args(x, weight, torch.float32)
    _tensor("residual", residual)
    _expect(residual.shape == x.shape and residual.dtype == x.dtype, "residual must match x")
    _rms_norm_into(_output("out", out, x, tuple(x.shape)), x + residual, weight, eps)


_rmsnorm_active.__name__ = _rmsnorm_legacy.__name__ = "rmsnorm"
_add_rmsnorm_active.__name__ = _add_rmsnorm_legacy.__name__ = "add_rmsnorm"
rmsnorm = _rmsnorm_active if FORM == "active" else _rmsnorm_legacy
add_rmsnorm = _add_rmsnorm_active if FORM == "active" else _add_rmsnorm_legacy


def _distinct(
    name: str,
    t: torch.Tensor,
    *,
    reason: str = "the recorded Gemma caller passes freshly allocated outputs (§2a)",
    **others: torch.Tensor,
) -> None:
    """`t` shares no memory with any of `others` (all contiguous, so byte ranges suffice)."""
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    for other_name, other in others.items():
        other_start = other.data_ptr()
        other_end = other_start + other.numel() * other.element_size()
        _expect(end <= other_start or other_end <= start,
                f"{name} must not alias {other_name}: {reason}")  # fmt: skip


def _gemma_args(x: object, weight: object, eps: object) -> None:
    """2-D x [rows, hidden] (the caller flattens), the raw Gemma w in the model dtype."""
    _tensor("x", x, 2)
    _norm_args(x, weight, None)
    _expect(isinstance(eps, float), f"eps must be a float, got {type(eps).__name__}")


@_kernel
def gemma_rmsnorm(x, weight, output, eps, enable_pdl, interweave, bias, force_sdnn, /) -> None:
    """output = x / rms(x) * (1 + w) (Gemma); all eight arguments positional, as recorded."""
    _gemma_args(x, weight, eps)
    _output("output", output, x, tuple(x.shape))
    _expect(enable_pdl is False and interweave is False and force_sdnn is False,
            "only enable_pdl=False, interweave=False, force_sdnn=False are modeled")  # fmt: skip
    _not_modeled("bias", bias)
    output.copy_(norm.gemma_rms_norm(x, weight, eps))


@_kernel
def gemma_add_rmsnorm(
    x, y, /, *, weight, output, eps, enable_pdl=False, interweaved=False,
    store_output_before_norm=True, bias=None, smooth=None, residual_output, force_sdnn=False,
) -> None:  # fmt: skip
    """output = norm(x + y) * (1 + w), residual_output = x + y, into fresh outputs (§2a)."""
    _gemma_args(x, weight, eps)
    _tensor("y", y, 2)
    _expect(y.shape == x.shape and y.dtype == x.dtype, "y (the residual) must match x")
    for name, out in (("output", output), ("residual_output", residual_output)):
        _output(name, out, x, tuple(x.shape))
        _distinct(name, out, x=x, y=y)
    _distinct("output", output, residual_output=residual_output)
    _expect(enable_pdl is False and interweaved is False and force_sdnn is False,
            "only enable_pdl=False, interweaved=False, force_sdnn=False are modeled")  # fmt: skip
    _expect(store_output_before_norm is True, "only store_output_before_norm=True is modeled")
    _not_modeled("bias", bias)
    _not_modeled("smooth", smooth)
    normed, summed = x.clone(), y.clone()
    norm.gemma_fused_add_rms_norm(normed, summed, weight, eps)
    residual_output.copy_(summed)
    output.copy_(normed)


# Activation and rotary embedding -----------------------------------------------------------


@_kernel
def swiglu(*, x, y) -> None:
    """y = silu(x[..., :d]) * x[..., d:] (the gated half is inferred, §4.4)."""
    _tensor("x", x)
    _floating("x", x)
    _expect(x.shape[-1] % 2 == 0, "x's last dimension must be even")
    _output("y", y, x, (*x.shape[:-1], x.shape[-1] // 2))
    y.copy_(activation.silu_and_mul(x))


@_kernel
def rotary_embedding(*, positions, query, key, head_size, cos_sin_cache, is_neox) -> None:
    """In place on query [T, H*D] and key [T, Hkv*D]; cos_sin_cache [max_pos, rot] = [cos|sin]."""
    _tensor("positions", positions, 1)
    _expect(not positions.dtype.is_floating_point, "positions must be integers")
    num_tokens = positions.numel()
    _expect(isinstance(head_size, int) and isinstance(is_neox, bool), "head_size/is_neox types")
    for name, t in (("query", query), ("key", key)):
        _tensor(name, t, 2)
        _floating(name, t, query.dtype)
        _expect(t.shape[0] == num_tokens and t.shape[1] % head_size == 0,
                f"{name} must be [T, heads*head_size], got {tuple(t.shape)}")  # fmt: skip
    _tensor("cos_sin_cache", cos_sin_cache, 2)
    _floating("cos_sin_cache", cos_sin_cache, query.dtype)  # the caller casts it (§2c)
    rotary_dim = cos_sin_cache.shape[1]
    _expect(rotary_dim % 2 == 0 and rotary_dim <= head_size, "bad rotary_dim")
    rotary.rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)


# KV cache and attention --------------------------------------------------------------------


@_kernel
def reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, /, *,
                            BLHD_LAYOUT=False) -> None:  # fmt: skip
    """Scatter key/value [T, Hkv, D] into the BHLD caches at slot = block * bs + offset."""
    _expect(BLHD_LAYOUT is False, "only BLHD_LAYOUT=False (BHLD caches) is modeled")
    for name, t in (("key", key), ("value", value)):
        _tensor(name, t, 3)
        _floating(name, t, key.dtype)
    _expect(value.shape == key.shape, "key and value must have the same shape")
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        _paged_cache(name, cache, key)
        _expect(cache.shape[1] == key.shape[1], f"{name} must have {key.shape[1]} kv heads")
    _tensor("slot_mapping", slot_mapping, 1)
    _expect(slot_mapping.dtype in (torch.int32, torch.int64), "slot_mapping must be integers")
    _expect(slot_mapping.numel() == key.shape[0], "slot_mapping must have one slot per token")
    block_size = key_cache.shape[2]
    capacity = min(key_cache.shape[0], value_cache.shape[0]) * block_size
    if slot_mapping.numel():
        _expect(int(slot_mapping.max()) < capacity, "slot out of the caches' range")
    kv_cache.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


def _attention_args(q, k_cache, v_cache, head_num: int, kv_head_num: int, head_dim: int):
    _floating("q", q)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _paged_cache(name, cache, q)
        _expect(cache.shape[1] == kv_head_num, f"{name} must have kv_head_num heads")
        _expect(cache.shape[2:] == k_cache.shape[2:], "k_cache and v_cache pages must match")
    _expect(q.shape[-2:] == (head_num, head_dim), "q must end in [head_num, head_dim]")
    _expect(head_num % kv_head_num == 0, "head_num must be a multiple of kv_head_num")


@_kernel
def speculative_attention(
    *, out, q, k_cache, v_cache, context_lens_cpu, context_lens_xpu, batch_num, qlen,
    max_context_len, head_num, head_dim, scale, kv_head_num, block_size,
    max_num_blocks_per_seq, max_window_size=-1, block_tables, sink=None,
) -> None:  # fmt: skip
    """Decode attention over the paged caches: q [1, B, H, D] (qlen=1), out [B, H, D]."""
    _expect(qlen == 1, "only qlen=1 (q [1, B, H, D]) is modeled")
    _tensor("q", q, 4)
    _expect(q.shape[:2] == (1, batch_num), "q must be [1, batch_num, H, D] for qlen=1")
    _attention_args(q, k_cache, v_cache, head_num, kv_head_num, head_dim)
    _output("out", out, q, (batch_num, head_num, head_dim))
    lens = _host_and_device("context_lens", context_lens_cpu, context_lens_xpu)
    _expect(lens.numel() == batch_num, "context_lens must hold one length per request")
    _expect(int(lens.max()) <= max_context_len, "a context is longer than max_context_len")
    _expect(block_size == k_cache.shape[2], "block_size must be k_cache.shape[2]")
    _expect(max_num_blocks_per_seq == block_tables.shape[1], "max_num_blocks_per_seq mismatch")
    _expect(isinstance(scale, float) and scale > 0, "scale must be an explicit float > 0 (§4.6)")
    _not_modeled("sink", sink)
    window = _window("max_window_size", max_window_size)
    table = _used_blocks(block_tables, lens, block_size, (k_cache, v_cache))
    dense_attention.decode_attention(out, q[0], k_cache, v_cache, table, context_lens_xpu,
                                     lens, int(lens.max()), max_context_len, scale, window,
                                     0.0)  # fmt: skip


@_kernel
def prefill_attention(
    *, q, k, v, out, is_causal=True, alpha=1.0, context_qlen_lod_cpu, context_qlen_lod_xpu,
    alibi_slopes=None, softmax_lse=None, swa_left=-1, swa_right=-1, sink=None,
    is_prefix_cache=False, block_table=None, context_kvlen_lod_cpu=None,
    context_kvlen_lod_xpu=None,
) -> None:  # fmt: skip
    """Varlen attention. The prefix-cache form is causal and k/v are the whole paged caches:
    query rows of request r are the last tokens of its kv length (context already in the cache,
    plus the new tokens, which are cached too). The dense form is modeled only non-causal (the
    encoder-only call): k/v are [T, Hkv, D] and every token sees its whole sequence.
    Scores are q.k / sqrt(head_dim) * alpha.
    """
    for name, value in (("alibi_slopes", alibi_slopes), ("softmax_lse", softmax_lse),
                        ("sink", sink)):  # fmt: skip
        _not_modeled(name, value)
    _tensor("q", q, 3)
    _expect(isinstance(alpha, float), "alpha must be a float")
    if not is_prefix_cache:
        _expect(is_causal is False, "only the non-causal dense form is modeled")
        _dense_bidirectional(q, k, v, out, alpha, context_qlen_lod_cpu, context_qlen_lod_xpu,
                             swa_left, swa_right, block_table, context_kvlen_lod_cpu)  # fmt: skip
        return
    _expect(is_causal is True, "only causal attention is modeled in the prefix-cache form")
    num_tokens, heads, head_dim = q.shape
    _attention_args(q, k, v, heads, k.shape[1], head_dim)
    _output("out", out, q, tuple(q.shape))
    _expect(isinstance(block_table, torch.Tensor), "the prefix-cache form needs block_table")
    batch = block_table.shape[0]
    q_lod = _lod("context_qlen_lod", context_qlen_lod_cpu, context_qlen_lod_xpu, batch)
    kv_lod = _lod("context_kvlen_lod", context_kvlen_lod_cpu, context_kvlen_lod_xpu, batch)
    _expect(int(q_lod[-1]) == num_tokens, "context_qlen_lod must end at the number of tokens")
    q_lens, kv_lens = q_lod.diff(), kv_lod.diff()
    _expect(bool((kv_lens >= q_lens).all()), "a kv length is shorter than its query length")
    window = _window("swa_left", swa_left)
    _expect(swa_right == (0 if window > 0 else -1), "swa_right must be 0 with a window, else -1")
    table = _used_blocks(block_table, kv_lens, k.shape[2], (k, v))
    dense_attention.prefill_attention(
        out, q, k, v, table, context_qlen_lod_xpu, q_lod, kv_lens.to(q.device),
        context_kvlen_lod_xpu, kv_lod, int(q_lens.max()), int(kv_lens.max()),
        alpha / math.sqrt(head_dim), window, 0.0,
    )  # fmt: skip


def _dense_bidirectional(q, k, v, out, alpha, lod_cpu, lod_xpu, swa_left, swa_right,
                         block_table, kvlen_lod_cpu) -> None:  # fmt: skip
    num_tokens, heads, head_dim = q.shape
    for name, t in (("k", k), ("v", v)):
        _tensor(name, t, 3)
        _expect(t.dtype == q.dtype, f"{name} must have dtype {q.dtype}, got {t.dtype}")
        _expect(t.shape[0] == num_tokens, f"{name} must have one row per query token")
        _expect(t.shape[2] == head_dim, f"{name} head dim must be {head_dim}")
    _expect(k.shape == v.shape, "k and v must have the same shape")
    _expect(heads % k.shape[1] == 0, "q heads must be a multiple of k heads")
    _output("out", out, q, tuple(q.shape))
    _expect(swa_left == -1 and swa_right == -1, "the dense form is modeled without a window")
    _expect(block_table is None and kvlen_lod_cpu is None, "the dense form takes no cache args")
    batch = _tensor("context_qlen_lod_cpu", lod_cpu, 1).numel() - 1
    lod = _lod("context_qlen_lod", lod_cpu, lod_xpu, batch)
    _expect(int(lod[-1]) == num_tokens, "context_qlen_lod must end at the number of tokens")
    dense_attention.encoder_attention(
        out, q, k, v, lod_xpu, lod, int(lod.diff().max()), alpha / math.sqrt(head_dim)
    )


# Multi-head latent attention (§2d: MLA-specific kernels, the MLA forms of paged_attention and
# attention, attention_merge_stage) ------------------------------------------------------------
# The recorded MLA kernels are seen with kv_lora_rank 512 and rope dim 64 only (576-wide cache
# rows, §3.4), so those are the only sizes accepted. Computed with the MLA family's reference.

MLA_LATENT = 512
MLA_ROPE = 64
MLA_ROW = MLA_LATENT + MLA_ROPE


def _mla_cache(name: str, cache: object, like: torch.Tensor, ndim: int) -> torch.Tensor:
    _tensor(name, cache, ndim)
    _expect(cache.dtype == like.dtype, f"{name} must have dtype {like.dtype}, got {cache.dtype}")
    _expect(cache.shape[-1] == MLA_ROW, f"{name} rows must be {MLA_ROW} wide ({MLA_LATENT} latent "
            f"+ {MLA_ROPE} rope), got {tuple(cache.shape)}")  # fmt: skip
    return cache


@_kernel
def concat_and_cache_mla(kv_c, k_pe, slot_mapping, kv_cache) -> None:
    """Write each token's row [kv_c | k_pe] into the MLA cache [num_blocks, block_size, 576] at
    slot = block * block_size + offset: kv_c [T, 512], k_pe [T, 64] (head dim squeezed), the
    flat slot_mapping [T] as vLLM gives it. Negative (padding) slots are skipped (assumed)."""
    _tensor("kv_c", kv_c, 2)
    _floating("kv_c", kv_c)
    _expect(kv_c.shape[1] == MLA_LATENT, f"kv_c must be [T, {MLA_LATENT}], got {tuple(kv_c.shape)}")
    _tensor("k_pe", k_pe, 2)
    _floating("k_pe", k_pe, kv_c.dtype)
    _expect(
        tuple(k_pe.shape) == (kv_c.shape[0], MLA_ROPE),
        f"k_pe must be [T, {MLA_ROPE}] (head dim squeezed), got {tuple(k_pe.shape)}",
    )
    _mla_cache("kv_cache", kv_cache, kv_c, 3)
    _tensor("slot_mapping", slot_mapping, 1)
    _expect(slot_mapping.dtype in (torch.int32, torch.int64), "slot_mapping must be integers")
    _expect(slot_mapping.numel() == kv_c.shape[0], "slot_mapping must have one slot per token")
    if slot_mapping.numel():
        capacity = kv_cache.shape[0] * kv_cache.shape[1]
        _expect(int(slot_mapping.max()) < capacity, "slot out of the cache's range")
    mla.concat_and_cache_mla(kv_c, k_pe, kv_cache, slot_mapping)


@_kernel
def paged_attention(
    out, q, k_cache, v_cache, block_table, context_lens_cpu, context_lens_xpu, is_context,
    is_causal, vo_head_dim, kv_lora_rank, qk_rope_head_dim, softmax_scale, /, *, q_r,
) -> None:  # fmt: skip
    """The MLA positional form (absorbed decode): q [B, 1, H, 576] with q_r=q (the rope part is
    q's last 64 columns, inferred), k_cache the MLA cache viewed [num_blocks, 1, block_size, 576],
    no v_cache (the latent rows are the values), out [B, 1, H, 512] = softmax(q . rows *
    softmax_scale) rows[:, :512]; context_lens are per-request lengths. The keyword (dense
    decode) form (x=, ..., out=, vo_head_dim=) is not modeled."""
    _tensor("q", q, 4)
    _floating("q", q)
    batch, qlen, heads, width = q.shape
    _expect(qlen == 1, "only one query per request (q [B, 1, H, 576]) is modeled")
    same = isinstance(q_r, torch.Tensor) and q_r.data_ptr() == q.data_ptr()
    _expect(same and q_r.shape == q.shape, "q_r must be q (the recorded call passes q_r=q)")
    _expect((kv_lora_rank, qk_rope_head_dim) == (MLA_LATENT, MLA_ROPE),
            f"kv_lora_rank and qk_rope_head_dim must be {MLA_LATENT} and {MLA_ROPE}, got "
            f"{kv_lora_rank!r} and {qk_rope_head_dim!r}")  # fmt: skip
    _expect(width == MLA_ROW, f"q must be [B, 1, H, {MLA_ROW}], got {tuple(q.shape)}")
    _mla_cache("k_cache", k_cache, q, 4)
    _expect(k_cache.shape[1] == 1, "k_cache must be viewed [num_blocks, 1, block_size, 576]")
    _expect(v_cache is None, "the MLA form passes v_cache=None")
    _expect(is_context is False, "the MLA decode form passes is_context=False")
    _expect(isinstance(is_causal, bool), "is_causal must be a bool")
    _expect(vo_head_dim == -1, "the MLA form passes vo_head_dim=-1")
    _expect(isinstance(softmax_scale, float) and softmax_scale > 0,
            "softmax_scale must be an explicit float > 0")  # fmt: skip
    _output("out", out, q, (batch, 1, heads, MLA_LATENT))
    lens = _host_and_device("context_lens", context_lens_cpu, context_lens_xpu)
    _expect(lens.numel() == batch, "context_lens must hold one length per request (not a lod)")
    _expect(bool((lens >= 1).all()), "every request's length counts at least its new token")
    table = _used_blocks(block_table, lens, k_cache.shape[2], (k_cache,))
    mla.mla_decode(out[:, 0], q[:, 0], k_cache[:, 0], table, context_lens_xpu, lens,
                   int(lens.max()), kv_lora_rank, softmax_scale)  # fmt: skip


@_kernel
def attention(
    *, q, k_cache, v_cache, out, is_causal=True, is_prefill=True, context_seq_lod_cpu,
    context_seq_lod_xpu, prefill_len=0, k_perchannel_scale=None, v_perchannel_scale=None,
    smooth=None, slot_mapping_cpu=None, slot_mapping_xpu=None, v_trans=False,
    v_trans_threshold=0, alpha=1.0, softmax_lse=None,
) -> None:  # fmt: skip
    """The MLA prefill form: varlen attention of q [T, H, D] over k_cache / v_cache [T, H, D] (V
    zero-padded to D by the caller), request r owning rows lod[r]:lod[r + 1] of all three (one
    lod pair); scores q . k / sqrt(D) * alpha (inferred); softmax_lse float32 [H, T],
    preallocated with -inf, receives the natural-log LSE (inferred). The legacy 4-D form
    ([B, T, H, D], no alpha) is not modeled."""
    _expect(is_prefill is True and prefill_len == 0, "only is_prefill=True, prefill_len=0")
    _expect(v_trans is False and v_trans_threshold == 0, "only v_trans=False, threshold 0")
    for name, value in (("k_perchannel_scale", k_perchannel_scale), ("smooth", smooth),
                        ("v_perchannel_scale", v_perchannel_scale),
                        ("slot_mapping_cpu", slot_mapping_cpu),
                        ("slot_mapping_xpu", slot_mapping_xpu)):  # fmt: skip
        _not_modeled(name, value)
    _tensor("q", q, 3)
    _floating("q", q)
    num_tokens, heads, head_dim = q.shape
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _tensor(name, t, 3)
        _expect(t.dtype == q.dtype, f"{name} must have dtype {q.dtype}, got {t.dtype}")
        _expect(t.shape == q.shape, f"{name} must be [T, H, D] like q (one lod pair; V padded "
                f"to the qk head dim), got {tuple(t.shape)}")  # fmt: skip
    _output("out", out, q, tuple(q.shape))
    _expect(isinstance(is_causal, bool), "is_causal must be a bool")
    _expect(isinstance(alpha, float), "alpha must be a float")
    _expect(softmax_lse is not None, "the recorded MLA prefill call always passes softmax_lse")
    _tensor("softmax_lse", softmax_lse, 2)
    _floating("softmax_lse", softmax_lse, torch.float32)
    _expect(tuple(softmax_lse.shape) == (heads, num_tokens),
            f"softmax_lse must be preallocated as [H, T] = {(heads, num_tokens)}")  # fmt: skip
    _expect(bool(torch.isneginf(softmax_lse).all()), "softmax_lse must be filled with -inf")
    batch = _tensor("context_seq_lod_cpu", context_seq_lod_cpu, 1).numel() - 1
    _expect(batch >= 1, "context_seq_lod must describe at least one request")
    lod = _lod("context_seq_lod", context_seq_lod_cpu, context_seq_lod_xpu, batch)
    _expect(int(lod[-1]) == num_tokens, "context_seq_lod must end at the number of tokens")
    longest = int(lod.diff().max())
    mla.mla_prefill(out, softmax_lse, q, k_cache, v_cache, context_seq_lod_xpu, lod,
                    context_seq_lod_xpu, lod, longest, longest, alpha / math.sqrt(head_dim),
                    is_causal)  # fmt: skip


@_kernel
def attention_merge_stage(prefix_output, prefix_lse, suffix_output, suffix_lse, output,
                          output_lse, /) -> None:  # fmt: skip
    """Merge two attentions over disjoint keys by their LSEs: outputs [T, H, D], LSEs float32
    [H, T] (natural log; the layout is inferred), output (and output_lse) after the inputs."""
    _tensor("prefix_output", prefix_output, 3)
    _floating("prefix_output", prefix_output)
    num_tokens, heads, _ = prefix_output.shape
    _tensor("suffix_output", suffix_output, 3)
    _floating("suffix_output", suffix_output, prefix_output.dtype)
    _expect(suffix_output.shape == prefix_output.shape, "the two outputs must have one shape")
    _output("output", output, prefix_output, tuple(prefix_output.shape))
    _expect(output_lse is not None, "output_lse=None is not modeled (the binding passes one)")
    for name, lse in (("prefix_lse", prefix_lse), ("suffix_lse", suffix_lse),
                      ("output_lse", output_lse)):  # fmt: skip
        _tensor(name, lse, 2)
        _floating(name, lse, torch.float32)
        _expect(
            tuple(lse.shape) == (heads, num_tokens),
            f"{name} must be [H, T] = {(heads, num_tokens)}, got {tuple(lse.shape)}",
        )
    reason = "vLLM's merge_attn_states writes into separate outputs"
    _distinct("output", output, reason=reason, prefix_output=prefix_output,
              suffix_output=suffix_output)  # fmt: skip
    _distinct("output_lse", output_lse, reason=reason, prefix_lse=prefix_lse,
              suffix_lse=suffix_lse)  # fmt: skip
    mla.merge_attention_states(output, output_lse, prefix_output, prefix_lse, suffix_output,
                               suffix_lse)  # fmt: skip


# Mixture of experts (§2f) --------------------------------------------------------------------
# Computed in plain torch as the kernels are recorded or inferred to behave (see
# vllm_kunlun/ops/moe/kunlun.py): top-k lists the highest score first, ties to the lower id.

#: Rows of block_statistic (§4.10), and the expert count the routing and pre-sort kernels are
#: reported to fail above (baidu/vLLM-Kunlun ops/_kunlun_ops.py at 00db81a).
MOE_BLOCKS = 12
MOE_MAX_EXPERTS = 512


def _moe_routing_outputs(x, score, index, score_name: str, score_dtype: torch.dtype) -> None:
    _tensor("x", x, 2)
    _floating("x", x)
    _tensor(score_name, score, 2)
    _expect(score.dtype == score_dtype, f"{score_name} must be {score_dtype}, got {score.dtype}")
    _tensor("topk_index", index, 2)
    _int32("topk_index", index)
    _expect(score.shape == index.shape and score.shape[0] == x.shape[0],
            f"{score_name} and topk_index must be preallocated as [M, k]")  # fmt: skip
    _expect(0 < index.shape[1] <= x.shape[1], "top-k must be between 1 and the expert count")


def _moe_block_statistic(name: str, t: object, experts: int, zeros: bool) -> torch.Tensor:
    _tensor(name, t, 2)
    _int32(name, t)
    _expect(tuple(t.shape) == (MOE_BLOCKS, experts),
            f"{name} must be int32 [{MOE_BLOCKS}, E={experts}], got {tuple(t.shape)}")  # fmt: skip
    if zeros:
        _expect(not bool(t.any()), f"{name} must be zero-initialized")
    return t


def _moe_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]


@_kernel
def moe_softmax_topk_norm(x, normed_score, topk_index, block_statistic, stable, /) -> None:
    """softmax(x fp32) top-k, then ALWAYS renormalized to sum 1 (no flag to turn it off)."""
    _moe_routing_outputs(x, normed_score, topk_index, "normed_score", torch.float32)
    _floating("x", x, torch.float32)  # the caller casts the router logits to fp32
    if block_statistic is not None:
        _moe_block_statistic("block_statistic", block_statistic, x.shape[1], zeros=True)
    _expect(isinstance(stable, bool), "stable must be a bool")
    probs = torch.softmax(x, dim=-1)
    ids = _moe_top(probs, topk_index.shape[1])
    weights = probs.gather(1, ids)
    normed_score.copy_(weights / weights.sum(dim=-1, keepdim=True))
    topk_index.copy_(ids)


@_kernel
def moe_softmax_topk(x, normed_score, topk_index, block_statistic, /) -> None:
    """softmax(x) top-k, weights in x's dtype, NOT normalized; block_statistic empty int32."""
    _moe_routing_outputs(x, normed_score, topk_index, "normed_score", x.dtype)
    _tensor("block_statistic", block_statistic)
    _int32("block_statistic", block_statistic)
    _expect(block_statistic.numel() == 0, "block_statistic must be an empty int32 tensor")
    probs = torch.softmax(x.float(), dim=-1)
    ids = _moe_top(probs, topk_index.shape[1])
    normed_score.copy_(probs.gather(1, ids))
    topk_index.copy_(ids)


@_kernel
def moe_sigmoid_group_topk_norm(
    *, x, norm_score, topk_index, block_static, bias, n_group, topk_group, scale
) -> None:
    """Choose on sigmoid(x) + bias among the topk_group groups with the largest top-two sums;
    weights = the chosen sigmoid(x), normalized to sum 1, times scale."""
    _moe_routing_outputs(x, norm_score, topk_index, "norm_score", torch.float32)
    _floating("x", x, torch.float32)
    experts = x.shape[1]
    _expect(experts <= MOE_MAX_EXPERTS, f"at most {MOE_MAX_EXPERTS} experts, got {experts}")
    _moe_block_statistic("block_static", block_static, experts, zeros=True)
    if bias is not None:
        _tensor("bias", bias, 1)
        _floating("bias", bias, torch.float32)
        _expect(bias.numel() == experts, "bias must be [E]")
    _expect(isinstance(n_group, int) and isinstance(topk_group, int), "n_group/topk_group ints")
    _expect(n_group > 0 and experts % n_group == 0, "E must be a multiple of n_group")
    _expect(0 < topk_group <= n_group, "topk_group must be between 1 and n_group")
    _expect(isinstance(scale, float), "scale must be a float")
    scores = torch.sigmoid(x)
    choice = scores if bias is None else scores + bias
    size = experts // n_group
    _expect(topk_index.shape[1] <= topk_group * size, "top-k exceeds the kept groups' experts")
    group_scores = choice.view(-1, n_group, size).topk(min(2, size), dim=-1).values.sum(-1)
    kept = torch.zeros_like(group_scores, dtype=torch.bool)
    kept.scatter_(1, _moe_top(group_scores, topk_group), True)
    masked = choice.masked_fill(~kept.repeat_interleave(size, dim=1), float("-inf"))
    ids = _moe_top(masked, topk_index.shape[1])
    weights = scores.gather(1, ids)
    norm_score.copy_(weights / weights.sum(dim=-1, keepdim=True) * scale)
    topk_index.copy_(ids)


def _moe_ids(name: str, ids: object, experts: int) -> torch.Tensor:
    _tensor(name, ids, 2)
    _int32(name, ids)
    in_range = bool(((ids >= 0) & (ids < experts)).all())
    _expect(in_range, f"{name} must hold local expert ids in [0, {experts})")
    return ids


def _moe_block_histograms(topk_ids: torch.Tensor, experts: int) -> torch.Tensor:
    """Per block of the flattened ids (12 near-equal chunks), how many go to each expert."""
    flat = topk_ids.reshape(-1).long()
    block = torch.arange(flat.numel(), device=flat.device) * MOE_BLOCKS // max(flat.numel(), 1)
    histogram = torch.zeros(MOE_BLOCKS * experts, dtype=torch.int32, device=flat.device)
    histogram.index_add_(0, block * experts + flat, torch.ones_like(flat, dtype=torch.int32))
    return histogram.view(MOE_BLOCKS, experts)


@_kernel
def gen_block_statistic(topk_ids, block_statistic, /) -> None:
    """Fills the zero-initialized int32 [12, E] block_statistic with per-block histograms."""
    _moe_block_statistic("block_statistic", block_statistic, block_statistic.shape[-1], True)
    _moe_ids("topk_ids", topk_ids, block_statistic.shape[1])
    block_statistic.copy_(_moe_block_histograms(topk_ids, block_statistic.shape[1]))


@_kernel
def moe_pre_sorted(
    x, topk_index, block_statistic, moe_expand, moe_index, expert_m, sorted_tokens_num_lod, /
) -> None:
    """Token rows sorted (stably) by expert into moe_expand [M·k, H]; moe_index[slot] = that
    slot's row; expert_m [E] = rows per expert; sorted_tokens_num_lod [E+1] their lod."""
    _tensor("x", x, 2)
    _floating("x", x)
    experts = _moe_block_statistic("block_statistic", block_statistic,
                                   block_statistic.shape[-1], zeros=False).shape[1]  # fmt: skip
    _expect(experts <= MOE_MAX_EXPERTS, f"at most {MOE_MAX_EXPERTS} experts, got {experts}")
    ids = _moe_ids("topk_index", topk_index, experts)
    _expect(ids.shape[0] == x.shape[0], "topk_index must have one row per token")
    _expect(torch.equal(block_statistic, _moe_block_histograms(ids, experts)),
            "block_statistic must be gen_block_statistic's result for topk_index")  # fmt: skip
    slots = ids.numel()
    _output("moe_expand", moe_expand, x, (slots, x.shape[1]))
    sizes = {"moe_index": (moe_index, slots), "expert_m": (expert_m, experts),
             "sorted_tokens_num_lod": (sorted_tokens_num_lod, experts + 1)}  # fmt: skip
    for name, (t, size) in sizes.items():
        _tensor(name, t, 1)
        _int32(name, t)
        _expect(t.numel() == size, f"{name} must be preallocated with {size} entries")
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    moe_expand.copy_(x[order // ids.shape[1]])
    moe_index.copy_(torch.argsort(order).to(torch.int32))
    counts = torch.bincount(flat, minlength=experts)
    expert_m.copy_(counts.to(torch.int32))
    sorted_tokens_num_lod.copy_(torch.cat([counts.new_zeros(1), counts.cumsum(0)]).int())


def _moe_lod(lod: object, experts: int, rows: int) -> torch.Tensor:
    _tensor("sorted_tokens_num_lod", lod, 1)
    _int32("sorted_tokens_num_lod", lod)
    _expect(lod.numel() == experts + 1, f"sorted_tokens_num_lod must have E+1={experts + 1}")
    _expect(int(lod[0]) == 0 and int(lod[-1]) == rows and bool((lod.diff() >= 0).all()),
            f"sorted_tokens_num_lod must be a lod [0, ..., {rows}]")  # fmt: skip
    return lod


def _moe_fc_quantized(x, weight, y, rows: int, moe_topk: int, lod: torch.Tensor,
                     x_perchannel_max, w_perchannel_max, topk_ids) -> torch.Tensor:  # fmt: skip
    """The W8A8 form's checks: int8 x and weight, x_perchannel_max float32 [M·k, 1] (per row of
    the sorted x), w_perchannel_max float32 [E, N] (or vLLM's [E, N, 1], the same memory),
    topk_ids int32 [M, k] of the ids that were sorted. -> the weight absmax as [E, N]."""
    _int8("x", x)
    _int8("weight", weight)
    experts, n, _ = weight.shape
    _expect(x_perchannel_max is not None and w_perchannel_max is not None,
            "the int8 form needs x_perchannel_max and w_perchannel_max")  # fmt: skip
    _tensor("x_perchannel_max", x_perchannel_max)
    _floating("x_perchannel_max", x_perchannel_max, torch.float32)
    _expect(tuple(x_perchannel_max.shape) == (rows, 1),
            f"x_perchannel_max must be [M·k={rows}, 1], one absmax per row of x")  # fmt: skip
    _tensor("w_perchannel_max", w_perchannel_max)
    _floating("w_perchannel_max", w_perchannel_max, torch.float32)
    _expect(tuple(w_perchannel_max.shape) in ((experts, n), (experts, n, 1)),
            f"w_perchannel_max must be [E={experts}, N={n}], one absmax per expert and output "
            f"channel, got {tuple(w_perchannel_max.shape)}")  # fmt: skip
    _expect(topk_ids is not None, "the recorded int8 form passes topk_ids")
    ids = _moe_ids("topk_ids", topk_ids, experts)
    _expect(tuple(ids.shape) == (rows // moe_topk, moe_topk), "topk_ids must be [M, k]")
    counts = torch.bincount(ids.reshape(-1).long(), minlength=experts)
    _expect(torch.equal(counts.to(lod.device), lod.diff().long()),
            "topk_ids must be the ids sorted into sorted_tokens_num_lod")  # fmt: skip
    _tensor("y", y)
    _floating("y", y)
    return w_perchannel_max.view(experts, n)


@_kernel
def moe_fc(
    *, x, weight, sorted_tokens_num_lod, sorted_tokens_idx, moe_topk, y, act=None,
    x_perchannel_max=None, w_perchannel_max=None, topk_ids=None, topk_w=None, bias=None,
    tgemm_type=None, tweight_type=None, scale_n=0, scale_k=0, use_pack_int4=False,
    sort_mode=True,
) -> None:  # fmt: skip
    """Grouped GEMM over expert-sorted rows: y row p = x row p @ weight[e].T for the expert e
    whose lod range holds p; y is [M, k, N] (a view of the sorted rows). Unquantized (float x
    and weight of one dtype), or W8A8: int8 x and weight, scaled by x_perchannel_max[p] / 127
    and w_perchannel_max[e, n] / 127 and rounded to y's dtype (the quant family's
    int8_scaled_mm, as inferred in vllm_kunlun/ops/moe/kunlun.py)."""
    _tensor("x", x, 2)
    _tensor("weight", weight, 3)
    experts, n, k_dim = weight.shape
    _expect(x.shape[1] == k_dim, f"x must be [M·k, {k_dim}] for weight [E, N, {k_dim}]")
    rows = x.shape[0]
    lod = _moe_lod(sorted_tokens_num_lod, experts, rows)
    _tensor("sorted_tokens_idx", sorted_tokens_idx, 1)
    _int32("sorted_tokens_idx", sorted_tokens_idx)
    _expect(sorted_tokens_idx.numel() == rows, "sorted_tokens_idx must have M·k entries")
    _expect(isinstance(moe_topk, int) and moe_topk > 0 and rows % moe_topk == 0, "bad moe_topk")
    quantized = x.dtype == torch.int8
    if quantized:
        w_max = _moe_fc_quantized(x, weight, y, rows, moe_topk, lod, x_perchannel_max,
                                  w_perchannel_max, topk_ids)  # fmt: skip
        _expect(tuple(y.shape) == (rows // moe_topk, moe_topk, n),
                f"y must be preallocated as {(rows // moe_topk, moe_topk, n)}")  # fmt: skip
    else:
        _floating("x", x)
        _floating("weight", weight, x.dtype)
        _output("y", y, x, (rows // moe_topk, moe_topk, n))
        for name, value in (("x_perchannel_max", x_perchannel_max), ("topk_ids", topk_ids),
                            ("w_perchannel_max", w_perchannel_max)):  # fmt: skip
            _not_modeled(name, value)
    _expect(act is None, "only act=None is modeled (the fused SWISH_GLU is not used)")
    for name, value in (("topk_w", topk_w), ("bias", bias), ("tgemm_type", tgemm_type),
                        ("tweight_type", tweight_type)):  # fmt: skip
        _not_modeled(name, value)
    _expect(scale_n == 0 and scale_k == 0 and use_pack_int4 is False and sort_mode is True,
            "only the unquantized and W8A8 sorted forms are modeled")  # fmt: skip
    bounds = lod.tolist()
    out = y.view(rows, n)
    for expert in range(experts):
        start, end = bounds[expert], bounds[expert + 1]
        if end == start:
            continue
        if quantized:
            out[start:end] = quant.int8_scaled_mm(x[start:end], x_perchannel_max[start:end],
                                                  weight[expert], w_max[expert], None, None,
                                                  y.dtype)  # fmt: skip
        else:
            out[start:end] = x[start:end] @ weight[expert].t()


@_kernel
def moe_post(x, moe_index, normed_scale, dequant_scale, y, /) -> None:
    """y[t] = sum_j x[moe_index[t, j]] * normed_scale[t, j] * dequant_scale[t, j] (x is the
    expert-sorted [M, k, H] output of moe_fc), accumulated in float32."""
    _tensor("x", x, 3)
    _floating("x", x)
    tokens, top_k, hidden = x.shape
    _tensor("moe_index", moe_index, 2)
    _int32("moe_index", moe_index)
    for name, t in (("normed_scale", normed_scale), ("dequant_scale", dequant_scale)):
        _tensor(name, t, 2)
        _floating(name, t, torch.float32)
    _expect(moe_index.shape == normed_scale.shape == dequant_scale.shape == (tokens, top_k),
            "moe_index, normed_scale and dequant_scale must be [M, k]")  # fmt: skip
    rows = moe_index.reshape(-1).long()
    _expect(torch.equal(rows.sort().values, torch.arange(rows.numel(), device=rows.device)),
            "moe_index must be a permutation of the M·k sorted rows")  # fmt: skip
    _output("y", y, x, (tokens, hidden))
    picked = x.reshape(tokens * top_k, hidden)[rows].float().view(tokens, top_k, hidden)
    scale = (normed_scale * dequant_scale).unsqueeze(-1)
    y.copy_((picked * scale).sum(dim=1))


# Quantization and quantized GEMM (§2g) -------------------------------------------------------
# Computed with the quant family's reference (vllm_kunlun/ops/quant/kunlun.py states what is
# assumed): quant2d rounds half to even and clamps to +-127, matmul accumulates exactly.


def _int8(name: str, t: torch.Tensor) -> None:
    _expect(t.dtype == torch.int8, f"{name} must be int8, got {t.dtype}")


@_kernel
def quant2d(x, y, max, force_sdnn=False) -> None:  # noqa: A002 (the recorded keyword)
    """Symmetric per-row int8 quantization: max [rows, 1] = the rows' absmax (not the scale),
    y = round(x / (max / 127)) in [-127, 127]."""
    _tensor("x", x, 2)  # the caller flattens to rows
    _floating("x", x)
    _tensor("y", y)
    _int8("y", y)
    _expect(tuple(y.shape) == tuple(x.shape), f"y must be preallocated as {tuple(x.shape)}")
    _tensor("max", max)
    _floating("max", max, torch.float32)
    _expect(tuple(max.shape) == (x.shape[0], 1), f"max must be preallocated as [{x.shape[0]}, 1]")
    _expect(force_sdnn is True, "only force_sdnn=True (every recorded activation use) is modeled")
    q, absmax = quant.int8_quant_per_token(x)
    y.copy_(q)
    max.copy_(absmax)


@_kernel
def matmul(*, x, w, out, x_trans=False, w_trans=True, alpha=1.0, beta=0.0, bias=None,
           x_max=None, w_max=None, x_pc_max=None, w_pc_max=None) -> None:  # fmt: skip
    """out = x @ w^T for int8 x [M, K] and w [N, K] (w_trans=True), scaled by
    x_pc_max [M, 1] / 127 per row and w_pc_max [N] / 127 per column, plus the fp32 bias.
    Only the symmetric W8A8 form is modeled (not the float GEMM, not beta=1 accumulation)."""
    _tensor("x", x, 2)
    _int8("x", x)
    _tensor("w", w, 2)
    _int8("w", w)
    _expect(x_trans is False and w_trans is True, "only x_trans=False, w_trans=True is modeled")
    rows, depth = x.shape
    channels = w.shape[0]
    _expect(w.shape[1] == depth, f"w must be [N, {depth}] (w_trans=True), got {tuple(w.shape)}")
    _expect(alpha == 1.0 and beta == 0.0, "only alpha=1.0, beta=0.0 is modeled")
    _not_modeled("x_max", x_max)
    _not_modeled("w_max", w_max)
    _expect(x_pc_max is not None and w_pc_max is not None, "W8A8 needs x_pc_max and w_pc_max")
    _tensor("x_pc_max", x_pc_max)
    _floating("x_pc_max", x_pc_max, torch.float32)
    _expect(tuple(x_pc_max.shape) == (rows, 1), f"x_pc_max must be [M={rows}, 1] per token")
    _tensor("w_pc_max", w_pc_max, 1)
    _floating("w_pc_max", w_pc_max, torch.float32)
    _expect(w_pc_max.numel() == channels, f"w_pc_max must be [N={channels}] per channel")
    if bias is not None:
        _tensor("bias", bias, 1)
        _floating("bias", bias, torch.float32)
        _expect(bias.numel() == channels, f"bias must be [N={channels}]")
    _tensor("out", out)
    _floating("out", out)
    _expect(
        tuple(out.shape) == (rows, channels), f"out must be preallocated as ({rows}, {channels})"
    )
    out.copy_(quant.int8_scaled_mm(x, x_pc_max, w, w_pc_max, None, bias, out.dtype))


# Weight-only int4: awq_gemm and awq_dequantize (§2g) ------------------------------------------
# Decoded here from the recorded repack, independently of the plugin's int4_layout.py; the
# arithmetic is the binding's assumption (vllm_kunlun/ops/quant/kunlun.py): W = (q - z) * s in
# float32, unsigned q and z; awq_gemm accumulates in float32 and rounds once to its fp16 out.

#: align_type 0 ("normal"): the nibble in bits 4i .. 4i+3 of word c is channel 8c + ORDER[i].
_AWQ_NORMAL_ORDER = (4, 0, 5, 1, 6, 2, 7, 3)


def _awq_unpack(name: str, packed: object, rows: int, channels: int) -> torch.Tensor:
    """int32 [rows, channels / 8] in the normal alignment -> int64 [rows, channels]."""
    _tensor(name, packed, 2)
    _int32(name, packed)
    words = channels // 8
    _expect(tuple(packed.shape) == (rows, words), f"{name} must be [{rows}, {words}] int32 words, "
            f"got {tuple(packed.shape)}")  # fmt: skip
    unsigned = packed.long() & 0xFFFFFFFF
    values = torch.empty(rows, words, 8, dtype=torch.int64, device=packed.device)
    for nibble, channel in enumerate(_AWQ_NORMAL_ORDER):
        values[:, :, channel] = (unsigned >> (4 * nibble)) & 0xF
    return values.reshape(rows, channels)


def _awq_weight(qweight, scales, zeros, group: object, align_type: object) -> torch.Tensor:
    """The float32 W [K, N] = (q - z[k // group]) * s[k // group]."""
    _expect(align_type in (0, 1), f"align_type must be 0 (normal) or 1 (fast), got {align_type}")
    _expect(align_type == 0, "only align_type=0 (normal) is modeled: the plugin never packs the "
            "fast alignment's 64-nibble interleave")  # fmt: skip
    _tensor("scales", scales, 2)
    _floating("scales", scales)
    groups, channels = scales.shape
    _expect(channels % 8 == 0, f"scales must have N a multiple of 8 columns, got {channels}")
    _tensor("qweight", qweight, 2)
    depth = qweight.shape[0]
    _expect(isinstance(group, int) and group > 0 and group * groups == depth,
            f"the group size must be K / #groups = {depth} / {groups}, got {group!r}")  # fmt: skip
    q = _awq_unpack("qweight", qweight, depth, channels)
    z = _awq_unpack("zeros", zeros, groups, channels)
    group_of_row = torch.arange(depth, device=q.device) // group
    return ((q - z[group_of_row]).double() * scales.double()[group_of_row]).float()


@_kernel
def awq_gemm(*, x, w, scale, zeros, out, align_type, group_size) -> None:
    """out fp16 [M, N] = x [M, K] @ W, W dequantized from w (qweight) int32 [K, N / 8], scale
    [K / group_size, N] and zeros (qzeros) int32 [K / group_size, N / 8]."""
    weight = _awq_weight(w, scale, zeros, group_size, align_type)
    _tensor("x", x, 2)
    _floating("x", x)
    rows, depth = x.shape
    _expect(depth == weight.shape[0], f"x must be [M, K={weight.shape[0]}], got {tuple(x.shape)}")
    _tensor("out", out)
    _floating("out", out, torch.float16)  # the only recorded out dtype
    shape = (rows, weight.shape[1])
    _expect(tuple(out.shape) == shape, f"out must be preallocated as {shape}")
    out.copy_(x.float() @ weight)


@_kernel
def awq_dequantize(*, qweight, scales, zeros, weight, group_m, quant_type=0, align_type) -> None:
    """weight fp16 [K, N] = W, dequantized from qweight int32 [K, N / 8], scales [K / group_m, N]
    and zeros int32 [K / group_m, N / 8]."""
    _expect(quant_type == 0, f"only quant_type=0 is recorded, got {quant_type}")
    dequantized = _awq_weight(qweight, scales, zeros, group_m, align_type)
    _tensor("weight", weight)
    _floating("weight", weight, torch.float16)  # the only recorded weight dtype
    shape = tuple(dequantized.shape)
    _expect(tuple(weight.shape) == shape, f"weight must be preallocated as {shape}")
    weight.copy_(dequantized)
