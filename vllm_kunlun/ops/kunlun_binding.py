"""The Kunlun kernel provider: the plugin's ops on the vendor library `kunlun_ops`.

Status: this path needs a Kunlun XPU with `kunlun_ops` installed, and it has never run on one.
It is verified only by tests/test_kunlun_contract.py, which runs it against a stand-in
`kunlun_ops` (tests/standin) that checks every call against the API recorded in KUNLUN.md
(call sites of the public baidu/vLLM-Kunlun plugin, kunlun_ops 0.1.58) and computes the results
with the reference kernels. Neither can tell what the real kernels do where KUNLUN.md §4 lists an
unknown; those that affect this binding:

- rmsnorm / add_rmsnorm signatures (§4.1): call sites disagree, so `load` probes
  `inspect.signature` and uses the active or the legacy form; the legacy form casts the weight to
  fp32 as its caller did, the active form passes the model dtype (§4.2: which is right is unknown).
- add_rmsnorm aliasing (§4.3): the active form passes output=x and residual_output=residual, as the
  recorded plugin does; that this is safe for every shape and dtype is assumed.
- swiglu (§4.4): silu on the first half, times the second half, is assumed (vLLM's convention).
- reshape_and_cache_flash (§4.5): BLHD_LAYOUT=False is taken to mean the head-major
  [blocks, heads, block_size, dim] cache; whether negative (padding) slots are skipped is unknown.
- speculative_attention (§4.6): only qlen=1 decodes are issued, with a 3-D `out`; batches of about
  1024 requests and more are known to fail on the recorded build (§3.4).
- sliding window (§4.7): vLLM's window is passed unchanged as swa_left / max_window_size, as the
  recorded plugin does; whether the kernels count the current token the same way is unchecked.
- contiguity (C1): kernels are assumed to read raw pointers and ignore strides, so
  non-contiguous inputs are copied and results copied back, and the plugin's K/V page views go
  through the "hybrid cache" trick (§3.3, see `_PagedKV`): doubled block ids into one contiguous
  cache. That the kernels index pages this way is inferred from the recorded plugin, not stated.
- key=None in rotary_embedding: not recorded; a scratch key is rotated instead.
- Logit soft-capping has no recorded kernel parameter: softcap > 0 raises NotImplementedError.
- Host copies (C3) are assumed to be read at launch: graph capture would freeze them (§3.2).
"""

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from vllm_kunlun.log import get_logger
from vllm_kunlun.ops import reference

logger = get_logger("ops")

ACTIVE = "active"
LEGACY = "legacy"

#: Keyword arguments each kernel is called with; `load` checks the installed build accepts them.
KEYWORDS: dict[str, tuple[str, ...]] = {
    "swiglu": ("x", "y"),
    "rotary_embedding": ("positions", "query", "key", "head_size", "cos_sin_cache", "is_neox"),
    "reshape_and_cache_flash": ("BLHD_LAYOUT",),
    "speculative_attention": (
        "out", "q", "k_cache", "v_cache", "context_lens_cpu", "context_lens_xpu", "batch_num",
        "qlen", "max_context_len", "head_num", "head_dim", "scale", "kv_head_num", "block_size",
        "max_num_blocks_per_seq", "max_window_size", "block_tables", "sink",
    ),
    "prefill_attention": (
        "q", "k", "v", "out", "is_causal", "alpha", "context_qlen_lod_cpu",
        "context_qlen_lod_xpu", "alibi_slopes", "softmax_lse", "swa_left", "swa_right", "sink",
        "is_prefix_cache", "block_table", "context_kvlen_lod_cpu", "context_kvlen_lod_xpu",
    ),
}  # fmt: skip
FORM_KEYWORDS = {
    ("add_rmsnorm", ACTIVE): ("residual_output", "weight", "eps", "output"),
    ("add_rmsnorm", LEGACY): ("out",),
    ("rmsnorm", LEGACY): ("out",),
}


def _parameters(fn: Callable) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as error:
        raise RuntimeError(
            f"vllm-kunlun cannot read the signature of kunlun_ops function {fn!r} ({error}); "
            "the binding needs introspectable kunlun_ops functions (KUNLUN.md C6)."
        ) from None


def _accepts(fn: Callable, keyword: str) -> bool:
    for p in _parameters(fn):
        if p.kind == p.VAR_KEYWORD or (p.name == keyword and p.kind != p.POSITIONAL_ONLY):
            return True
    return False


def _eps_position(fn: Callable) -> int | None:
    names = [p.name for p in _parameters(fn) if p.kind != p.KEYWORD_ONLY]
    return next((i for i, name in enumerate(names) if name.startswith("eps")), None)


def _rmsnorm_form(fn: Callable) -> str:
    """Active (x, weight, output, eps) or legacy (x, weight, eps, out=): told apart by eps."""
    position = _eps_position(fn)
    if position == 3:
        return ACTIVE
    if position == 2 and _accepts(fn, "out"):
        return LEGACY
    raise RuntimeError(
        f"kunlun_ops.rmsnorm{inspect.signature(fn)} matches neither recorded form, "
        "(x, weight, output, eps) nor (x, weight, eps, out=); update vllm_kunlun/ops/"
        "kunlun_binding.py for this kunlun_ops build."
    )


def _add_rmsnorm_form(fn: Callable) -> str:
    """Active: keywords residual_output=, weight=, eps=, output=; legacy: (x, r, w, eps, out=)."""
    if all(_accepts(fn, k) for k in FORM_KEYWORDS["add_rmsnorm", ACTIVE]):
        return ACTIVE
    if _eps_position(fn) == 3 and _accepts(fn, "out"):
        return LEGACY
    raise RuntimeError(
        f"kunlun_ops.add_rmsnorm{inspect.signature(fn)} matches neither recorded form, "
        "(x, residual, residual_output=, weight=, eps=, output=) nor "
        "(x, residual, weight, eps, out=); update vllm_kunlun/ops/kunlun_binding.py."
    )


def _check_keywords(ops: ModuleType, forms: dict[str, str]) -> None:
    expected = dict(KEYWORDS)
    for name, form in forms.items():
        expected[name] = FORM_KEYWORDS.get((name, form), ())
    problems = []
    for name, keywords in expected.items():
        fn = getattr(ops, name, None)
        if fn is None:
            problems.append(f"kunlun_ops.{name} is missing")
            continue
        missing = [k for k in keywords if not _accepts(fn, k)]
        if missing:
            problems.append(f"kunlun_ops.{name} does not accept {', '.join(missing)}")
    if problems:
        raise RuntimeError(
            "The installed kunlun_ops does not match the API vllm-kunlun was written against "
            f"(kunlun_ops 0.1.58, KUNLUN.md §2): {'; '.join(problems)}."
        )


def _import_kunlun_ops() -> ModuleType:
    try:
        return importlib.import_module("kunlun_ops")
    except (ImportError, OSError) as error:
        raise RuntimeError(
            f"vllm-kunlun's Kunlun kernel provider needs the Kunlun kernel library kunlun_ops, "
            f"and `import kunlun_ops` failed: {error!r}. Install the kunlun_ops wheel that "
            "matches your XRE and xpytorch (kunlun_ops 0.1.58 is the recorded build), or set "
            "VLLM_KUNLUN_KERNELS=reference to run the reference kernels instead."
        ) from error


def _dense(t: torch.Tensor) -> torch.Tensor:
    """Kunlun kernels read raw pointers (KUNLUN.md C1): hand them contiguous memory."""
    return t if t.is_contiguous() else t.contiguous()


def _write_back(dst: torch.Tensor, src: torch.Tensor) -> None:
    """After a kernel wrote `src` (a contiguous stand-in for `dst`), update `dst` if needed."""
    if src is not dst:
        dst.copy_(src.view(dst.shape))


def _window(sliding_window: int) -> int:
    return sliding_window if sliding_window > 0 else -1


def _no_softcap(softcap: float) -> None:
    if softcap > 0:
        raise NotImplementedError(
            f"Logit soft-capping (softcap={softcap}) has no known kunlun_ops parameter; run "
            "this model with VLLM_KUNLUN_KERNELS=reference (the reference kernels support it)."
        )


@dataclass(frozen=True)
class _PagedKV:
    """The K and V caches as kernels must see them, and how block ids and slots map into them.

    The plugin's KV cache is one contiguous [num_blocks, Hkv, bs, 2 * D] tensor per layer whose
    blocks are [K page, V page]; the ops get the two non-contiguous page views. A kernel that
    indexes pages from the base pointer sees that buffer as 2 * num_blocks contiguous pages, so:
    k = all pages, v = all pages from page 1 on, block b -> page 2b, slot s -> s + (s // bs) * bs.
    """

    k: torch.Tensor
    v: torch.Tensor
    block_factor: int

    @classmethod
    def of(cls, key_cache: torch.Tensor, value_cache: torch.Tensor) -> "_PagedKV":
        if key_cache.is_contiguous() and value_cache.is_contiguous():
            return cls(key_cache, value_cache, 1)
        pages = _interleaved_pages(key_cache, value_cache)
        return cls(pages, pages[1:], 2)

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    def block_table(self, block_table: torch.Tensor) -> torch.Tensor:
        return _dense((block_table * self.block_factor).to(torch.int32))

    def slot_mapping(self, slot_mapping: torch.Tensor) -> torch.Tensor:
        if self.block_factor == 1:
            return _dense(slot_mapping)
        shifted = slot_mapping + (slot_mapping // self.block_size) * self.block_size
        return torch.where(slot_mapping >= 0, shifted, slot_mapping)  # keep padding slots


def _interleaved_pages(key_cache: torch.Tensor, value_cache: torch.Tensor) -> torch.Tensor:
    """[2 * num_blocks, Hkv, bs, D] over the buffer whose K and V page views were passed."""
    num_blocks, kv_heads, block_size, head_size = key_cache.shape
    page = kv_heads * block_size * head_size
    page_strides = (2 * page, block_size * head_size, head_size, 1)
    offset = value_cache.data_ptr() - key_cache.data_ptr()
    storage_end = key_cache.storage_offset() + 2 * num_blocks * page
    if not (
        value_cache.shape == key_cache.shape
        and value_cache.dtype == key_cache.dtype
        and value_cache.device == key_cache.device
        and key_cache.stride() == value_cache.stride() == page_strides
        and offset == page * key_cache.element_size()
        and storage_end * key_cache.element_size() <= key_cache.untyped_storage().nbytes()
    ):
        raise ValueError(
            "The Kunlun kernels need contiguous K and V caches, or the K and V page views of one "
            "contiguous [num_blocks, Hkv, block_size, 2 * D] buffer (vllm_kunlun.attention."
            f"backend.split_kv_cache); got K {tuple(key_cache.shape)} strides "
            f"{key_cache.stride()} and V strides {value_cache.stride()} at byte offset {offset}."
        )
    return key_cache.as_strided(
        (2 * num_blocks, kv_heads, block_size, head_size),
        (page, block_size * head_size, head_size, 1),
    )


class KunlunProvider:
    """The plugin's ops on `kunlun_ops`; same methods and signatures as ReferenceProvider."""

    name = "kunlun"
    description = "Kunlun kernel library (kunlun_ops)"

    def __init__(self, ops: ModuleType, rmsnorm_form: str, add_rmsnorm_form: str) -> None:
        self.ops = ops
        self.rmsnorm_form = rmsnorm_form
        self.add_rmsnorm_form = add_rmsnorm_form

    @classmethod
    def load(cls) -> "KunlunProvider":
        """Import kunlun_ops, pick the signature forms it exposes, check the rest of its API."""
        ops = _import_kunlun_ops()
        for name in ("rmsnorm", "add_rmsnorm"):
            if not callable(getattr(ops, name, None)):
                raise RuntimeError(f"kunlun_ops.{name} is missing; vllm-kunlun needs it.")
        forms = {"rmsnorm": _rmsnorm_form(ops.rmsnorm),
                 "add_rmsnorm": _add_rmsnorm_form(ops.add_rmsnorm)}  # fmt: skip
        _check_keywords(ops, forms)
        logger.info(
            "kunlun_ops %s (%s): rmsnorm uses the %s form, add_rmsnorm the %s form",
            getattr(ops, "__version__", "version unknown"),
            getattr(ops, "__file__", "?"),
            forms["rmsnorm"],
            forms["add_rmsnorm"],
        )
        return cls(ops, forms["rmsnorm"], forms["add_rmsnorm"])

    # Norms ----------------------------------------------------------------------------------

    def _norm_weight(self, weight: torch.Tensor, form: str) -> torch.Tensor:
        # The legacy callers cast the weight to fp32; the active ones pass the model dtype.
        return _dense(weight.float() if form == LEGACY else weight)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x = _dense(x)
        output = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        w = self._norm_weight(weight, self.rmsnorm_form)
        if self.rmsnorm_form == ACTIVE:
            self.ops.rmsnorm(x, w, output, eps)
        else:
            self.ops.rmsnorm(x, w, eps, out=output)
        return output

    def fused_add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> None:
        w = self._norm_weight(weight, self.add_rmsnorm_form)
        x_dense, residual_dense = _dense(x), _dense(residual)
        if self.add_rmsnorm_form == ACTIVE:
            self.ops.add_rmsnorm(
                x_dense, residual_dense, residual_output=residual_dense, weight=w, eps=eps,
                output=x_dense,
            )  # fmt: skip
            _write_back(x, x_dense)
            _write_back(residual, residual_dense)
        else:
            # The legacy kernel writes only the normalized sum; the sum itself is ours to keep.
            normed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            self.ops.add_rmsnorm(x_dense, residual_dense, w, eps, out=normed)
            residual.add_(x)
            x.copy_(normed)

    # Rotary embedding and activation --------------------------------------------------------

    def rotary_embedding(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor | None,
        head_size: int,
        cos_sin_cache: torch.Tensor,
        is_neox: bool,
    ) -> None:
        num_tokens = positions.numel()
        q = _dense(query).view(num_tokens, -1)
        if key is None:
            # How the kernel treats key=None is not recorded: rotate a one-head scratch key.
            k = query.new_zeros(num_tokens, head_size)
        else:
            k = _dense(key).view(num_tokens, -1)
        self.ops.rotary_embedding(
            positions=_dense(positions.flatten()), query=q, key=k, head_size=head_size,
            cos_sin_cache=_dense(cos_sin_cache.to(query.dtype)), is_neox=is_neox,
        )  # fmt: skip
        if not query.is_contiguous():
            query.copy_(q.view(query.shape))
        if key is not None and not key.is_contiguous():
            key.copy_(k.view(key.shape))

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        y = x.new_empty(*x.shape[:-1], x.shape[-1] // 2)
        self.ops.swiglu(x=_dense(x), y=y)
        return y

    def gelu_and_mul(self, x: torch.Tensor, approximate: str) -> torch.Tensor:
        # KUNLUN.md records no reliable fused GELU-and-mul kernel, so this runs the reference's
        # PyTorch ops on the XPU. Unverified on hardware.
        return reference.gelu_and_mul(x, approximate)

    # KV cache and attention ------------------------------------------------------------------

    def reshape_and_cache(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        kv = _PagedKV.of(key_cache, value_cache)
        self.ops.reshape_and_cache_flash(
            _dense(key.to(kv.k.dtype)), _dense(value.to(kv.v.dtype)), kv.k, kv.v,
            kv.slot_mapping(slot_mapping), BLHD_LAYOUT=False,
        )  # fmt: skip

    def decode_attention(
        self,
        out: torch.Tensor,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_cpu: torch.Tensor,
        max_seq_len: int,
        max_model_len: int,
        scale: float,
        sliding_window: int,
        softcap: float,
    ) -> None:
        _no_softcap(softcap)
        kv = _PagedKV.of(key_cache, value_cache)
        batch, heads, head_size = query.shape
        block_tables = kv.block_table(block_table)
        dst = _dense(out)
        self.ops.speculative_attention(
            out=dst,
            q=_dense(query).unsqueeze(0),
            k_cache=kv.k,
            v_cache=kv.v,
            context_lens_cpu=_dense(seq_lens_cpu.to(torch.int32)),
            context_lens_xpu=_dense(seq_lens.to(torch.int32)),
            batch_num=batch,
            qlen=1,
            max_context_len=max_model_len,
            head_num=heads,
            head_dim=head_size,
            scale=scale,
            kv_head_num=kv.k.shape[1],
            block_size=kv.block_size,
            max_num_blocks_per_seq=block_tables.shape[1],
            max_window_size=_window(sliding_window),
            block_tables=block_tables,
            sink=None,
        )
        _write_back(out, dst)

    def prefill_attention(
        self,
        out: torch.Tensor,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        block_table: torch.Tensor,
        query_start_loc: torch.Tensor,
        query_start_loc_cpu: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_start_loc: torch.Tensor,
        seq_start_loc_cpu: torch.Tensor,
        max_query_len: int,
        max_seq_len: int,
        scale: float,
        sliding_window: int,
        softcap: float,
    ) -> None:
        _no_softcap(softcap)
        kv = _PagedKV.of(key_cache, value_cache)
        window = _window(sliding_window)
        dst = _dense(out)
        self.ops.prefill_attention(
            q=_dense(query),
            k=kv.k,
            v=kv.v,
            out=dst,
            is_causal=True,
            # The kernel scales scores by 1/sqrt(head_dim) itself, then by alpha.
            alpha=scale * math.sqrt(query.shape[-1]),
            context_qlen_lod_cpu=_dense(query_start_loc_cpu.to(torch.int32)),
            context_qlen_lod_xpu=_dense(query_start_loc.to(torch.int32)),
            alibi_slopes=None,
            softmax_lse=None,
            swa_left=window,
            swa_right=0 if window > 0 else -1,
            sink=None,
            is_prefix_cache=True,
            block_table=kv.block_table(block_table),
            context_kvlen_lod_cpu=_dense(seq_start_loc_cpu.to(torch.int32)),
            context_kvlen_lod_xpu=_dense(seq_start_loc.to(torch.int32)),
        )
        _write_back(out, dst)

    def encoder_attention(
        self,
        out: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        query_start_loc: torch.Tensor,
        query_start_loc_cpu: torch.Tensor,
        max_query_len: int,
        scale: float,
    ) -> None:
        # The dense form with is_causal=False, as newer branches of the recorded plugin call it
        # for encoder-only models (KUNLUN.md, prefill_attention); queries are their own keys.
        dst = _dense(out)
        lod_cpu = _dense(query_start_loc_cpu.to(torch.int32))
        lod = _dense(query_start_loc.to(torch.int32))
        self.ops.prefill_attention(
            q=_dense(query),
            k=_dense(key),
            v=_dense(value),
            out=dst,
            is_causal=False,
            alpha=scale * math.sqrt(query.shape[-1]),
            context_qlen_lod_cpu=lod_cpu,
            context_qlen_lod_xpu=lod,
            alibi_slopes=None,
            softmax_lse=None,
            swa_left=-1,
            swa_right=-1,
            sink=None,
        )
        _write_back(out, dst)
