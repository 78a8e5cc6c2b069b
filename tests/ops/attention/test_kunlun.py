"""The Kunlun binding against the recorded kunlun_ops API (no engine, no XPU).

tests/standin/kunlun_ops checks every call the binding makes against KUNLUN.md and computes the
result with the reference kernels; each provider method must then match the reference kernels
on the plugin's real KV-cache layout. This is all the verification the binding has until it runs
on a Kunlun XPU.
"""

import importlib
import inspect
import itertools
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import pytest
import torch

from vllm_kunlun.attention.backend import split_kv_cache
from vllm_kunlun.ops import kunlun_binding, reference
from vllm_kunlun.ops.kunlun_binding import KunlunProvider
from vllm_kunlun.ops.provider import OP_NAMES, ReferenceProvider, choose_provider

STANDIN = Path(__file__).parent / "standin"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEADS = [(4, 4), (8, 2), (4, 1)]  # (query heads, kv heads): MHA, GQA, MQA
HEAD_SIZE = 32


@pytest.fixture
def use_standin(monkeypatch):
    """use_standin(form) -> the stand-in kunlun_ops, freshly imported with that signature form."""

    def use(form: str = "active") -> ModuleType:
        monkeypatch.setenv("KUNLUN_STANDIN_FORM", form)
        monkeypatch.syspath_prepend(str(STANDIN))
        sys.modules.pop("kunlun_ops", None)  # a cached import may carry the other form
        return importlib.import_module("kunlun_ops")

    yield use
    sys.modules.pop("kunlun_ops", None)


@pytest.fixture
def provider(use_standin) -> KunlunProvider:
    use_standin("active")
    return KunlunProvider.load()


@pytest.fixture(params=["active", "legacy"])
def form_provider(request, use_standin) -> KunlunProvider:
    use_standin(request.param)
    return KunlunProvider.load()


@pytest.fixture
def binding_log(caplog):
    # Plugin loggers live under vLLM's "vllm" logger, which may not propagate to the root.
    caplog.set_level(logging.INFO, logger=kunlun_binding.logger.name)
    kunlun_binding.logger.addHandler(caplog.handler)
    yield caplog
    kunlun_binding.logger.removeHandler(caplog.handler)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def calls() -> dict[str, int]:
    return dict(sys.modules["kunlun_ops"].CALLS)


def wide_view(rows: int, cols: int, dtype: torch.dtype, extra: int = 16) -> torch.Tensor:
    """A [rows, cols] non-contiguous view, like q/k/v split out of a fused qkv projection."""
    return torch.randn(rows, cols + extra).to(dtype)[:, extra:]


# Loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["active", "legacy"])
def test_load_picks_and_logs_the_signature_form(form, use_standin, binding_log):
    use_standin(form)
    loaded = KunlunProvider.load()
    assert (loaded.rmsnorm_form, loaded.add_rmsnorm_form) == (form, form)
    message = "\n".join(r.getMessage() for r in binding_log.records)
    assert f"rmsnorm uses the {form} form, add_rmsnorm the {form} form" in message
    assert "0.1.58+standin" in message


def test_provider_has_exactly_the_reference_ops_and_signatures(provider):
    reference_provider = ReferenceProvider()
    for name in OP_NAMES:
        ours = inspect.signature(getattr(provider, name)).parameters.values()
        theirs = inspect.signature(getattr(reference_provider, name)).parameters.values()
        assert [(p.name, p.kind) for p in ours] == [(p.name, p.kind) for p in theirs], name
    methods = {n for n, v in vars(KunlunProvider).items() if inspect.isfunction(v)}
    assert {n for n in methods if not n.startswith("_")} == set(OP_NAMES)
    assert KunlunProvider.name == "kunlun"


@pytest.mark.parametrize(
    ("probe", "fn", "form"),
    [
        ("rmsnorm", lambda x, weight, output, eps: None, "active"),
        ("rmsnorm", lambda x, weight, out, eps, interweave=False: None, "active"),
        ("rmsnorm", lambda x, weight, eps, out=None: None, "legacy"),
        ("add_rmsnorm", lambda x, residual, residual_output=None, weight=None, eps=1e-6,
         output=None, bias=None: None, "active"),
        ("add_rmsnorm", lambda x, y, weight, eps, out=None: None, "legacy"),
    ],
)  # fmt: skip
def test_signature_probe_tolerates_unrecorded_parameter_names(probe, fn, form):
    assert getattr(kunlun_binding, f"_{probe}_form")(fn) == form


def test_load_explains_a_missing_library(monkeypatch):
    monkeypatch.setitem(sys.modules, "kunlun_ops", None)  # makes `import kunlun_ops` fail
    with pytest.raises(RuntimeError, match="import kunlun_ops.*VLLM_KUNLUN_KERNELS=reference"):
        KunlunProvider.load()


def test_load_rejects_an_unrecognized_rmsnorm_signature(use_standin, monkeypatch):
    ops = use_standin()
    monkeypatch.setattr(ops, "rmsnorm", lambda x, weight, scale, out: None)
    with pytest.raises(RuntimeError, match="rmsnorm.*matches neither recorded form"):
        KunlunProvider.load()


def test_load_rejects_a_build_without_max_window_size(use_standin, monkeypatch):
    ops = use_standin()
    older = inspect.signature(ops.speculative_attention)
    params = [p for p in older.parameters.values() if p.name != "max_window_size"]

    def speculative_attention(**kwargs) -> None: ...

    speculative_attention.__signature__ = older.replace(parameters=params)
    monkeypatch.setattr(ops, "speculative_attention", speculative_attention)
    with pytest.raises(RuntimeError, match="speculative_attention does not accept max_window"):
        KunlunProvider.load()


# Choosing the provider ---------------------------------------------------------------------


def test_auto_chooses_kunlun_when_kunlun_ops_imports(use_standin, monkeypatch):
    use_standin()
    monkeypatch.setenv("VLLM_KUNLUN_KERNELS", "auto")
    chosen = choose_provider()
    assert isinstance(chosen, KunlunProvider)
    assert chosen.ops is sys.modules["kunlun_ops"]


def test_reference_is_chosen_on_request_even_with_kunlun_ops(use_standin, monkeypatch):
    use_standin()
    monkeypatch.setenv("VLLM_KUNLUN_KERNELS", "reference")
    assert isinstance(choose_provider(), ReferenceProvider)


def test_without_kunlun_ops_auto_falls_back_and_kunlun_fails(monkeypatch):
    monkeypatch.setitem(sys.modules, "kunlun_ops", None)
    monkeypatch.setenv("VLLM_KUNLUN_KERNELS", "auto")
    assert isinstance(choose_provider(), ReferenceProvider)
    monkeypatch.setenv("VLLM_KUNLUN_KERNELS", "kunlun")
    with pytest.raises(RuntimeError, match="needs the Kunlun kernel library kunlun_ops"):
        choose_provider()


# Norms, activation, rotary embedding -------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_rms_norm(form_provider, dtype, contiguous):
    hidden = 48
    x = torch.randn(5, hidden).to(dtype) if contiguous else wide_view(5, hidden, dtype)
    weight = torch.randn(hidden).to(dtype)
    got = form_provider.rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(got, reference.rms_norm(x, weight, 1e-6))
    assert calls() == {"rmsnorm": 1}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_fused_add_rms_norm_is_in_place(form_provider, dtype, contiguous):
    hidden = 48
    make = (lambda: torch.randn(5, hidden).to(dtype)) if contiguous else (
        lambda: wide_view(5, hidden, dtype))  # fmt: skip
    x, residual = make(), make()
    weight = torch.randn(hidden).to(dtype)
    want_x, want_residual = x.clone(), residual.clone()
    reference.fused_add_rms_norm(want_x, want_residual, weight, 1e-6)
    form_provider.fused_add_rms_norm(x, residual, weight, 1e-6)
    torch.testing.assert_close(residual, want_residual)
    torch.testing.assert_close(x, want_x)
    assert calls() == {"add_rmsnorm": 1}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 40), (2, 3, 40)])
@pytest.mark.parametrize("contiguous", [True, False])
def test_silu_and_mul(provider, dtype, shape, contiguous):
    x = torch.randn(*shape).to(dtype)
    if not contiguous:
        x = torch.cat([x, x], dim=-1)[..., 7 : 7 + shape[-1]]
    got = provider.silu_and_mul(x)
    torch.testing.assert_close(got, reference.silu_and_mul(x))
    assert calls() == {"swiglu": 1}


def cos_sin_cache(max_position: int, rotary_dim: int, dtype: torch.dtype) -> torch.Tensor:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    angles = torch.outer(torch.arange(max_position).float(), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [HEAD_SIZE, HEAD_SIZE // 2])
@pytest.mark.parametrize("layout", ["qkv_views", "contiguous", "no_key"])
def test_rotary_embedding(provider, dtype, is_neox, rotary_dim, layout):
    tokens, heads, kv_heads = 7, 4, 2
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * HEAD_SIZE).to(dtype)
    sizes = [heads * HEAD_SIZE, kv_heads * HEAD_SIZE, kv_heads * HEAD_SIZE]
    query, key, _ = qkv.split(sizes, dim=-1)
    if layout != "qkv_views":
        query, key = query.contiguous(), key.contiguous()
    if layout == "no_key":
        key = None
    positions = torch.randint(0, 64, (tokens,))
    cache = cos_sin_cache(64, rotary_dim, dtype)
    want_q = query.clone()
    want_k = None if key is None else key.clone()
    reference.rotary_embedding(positions, want_q, want_k, HEAD_SIZE, cache, is_neox)
    query_ptr = query.data_ptr()
    provider.rotary_embedding(positions, query, key, HEAD_SIZE, cache, is_neox)
    torch.testing.assert_close(query, want_q)
    if key is not None:
        torch.testing.assert_close(key, want_k)
    assert query.data_ptr() == query_ptr
    assert calls() == {"rotary_embedding": 1}


# KV cache and attention --------------------------------------------------------------------


def plugin_kv_cache(
    num_blocks: int, kv_heads: int, block_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plugin's per-layer cache and the K/V page views the attention backend passes."""
    buffer = torch.randn(num_blocks, kv_heads, block_size, 2 * HEAD_SIZE).to(dtype)
    return buffer, *split_kv_cache(buffer)


def random_block_table(seq_lens: list[int], block_size: int) -> tuple[torch.Tensor, int]:
    """Distinct random blocks per request, one spare column; returns (table, num_blocks)."""
    width = math.ceil(max(seq_lens) / block_size) + 1
    num_blocks = len(seq_lens) * width + 3
    ids = torch.randperm(num_blocks)[: len(seq_lens) * width]
    return ids.view(len(seq_lens), width).to(torch.int32), num_blocks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_reshape_and_cache_writes_the_plugin_layout(provider, dtype, block_size):
    kv_heads, num_blocks, tokens = 2, 6, 20
    buffer, key_cache, value_cache = plugin_kv_cache(num_blocks, kv_heads, block_size, dtype)
    want = buffer.clone()
    slots = torch.randperm(num_blocks * block_size)[:tokens]
    slots[3] = -1  # a padding token
    kv = wide_view(tokens, 2 * kv_heads * HEAD_SIZE, dtype).view(tokens, 2, kv_heads, HEAD_SIZE)
    key, value = kv[:, 0], kv[:, 1]  # non-contiguous, as split out of qkv
    reference.reshape_and_cache(key, value, *split_kv_cache(want), slots)
    provider.reshape_and_cache(key, value, key_cache, value_cache, slots)
    assert torch.equal(buffer, want)
    assert calls() == {"reshape_and_cache_flash": 1}


def lod(lengths: Sequence[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def decode_case(
    heads: int, kv_heads: int, block_size: int, dtype: torch.dtype,
    seq_lens: Sequence[int] = (1, 17, 40, 33, 9),
) -> dict:  # fmt: skip
    seq_lens = list(seq_lens)
    table, num_blocks = random_block_table(seq_lens, block_size)
    _, key_cache, value_cache = plugin_kv_cache(num_blocks, kv_heads, block_size, dtype)
    query = wide_view(len(seq_lens), heads * HEAD_SIZE, dtype).view(-1, heads, HEAD_SIZE)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return dict(query=query, key_cache=key_cache, value_cache=value_cache, block_table=table,
                seq_lens=lens, seq_lens_cpu=lens.clone(), max_seq_len=max(seq_lens))  # fmt: skip


def run_decode(
    provider: KunlunProvider, case: dict, sliding_window: int = -1, softcap: float = 0.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    query = case["query"]
    out = torch.empty(query.shape, dtype=query.dtype) if out is None else out
    provider.decode_attention(
        out, query, case["key_cache"], case["value_cache"], case["block_table"], case["seq_lens"],
        case["seq_lens_cpu"], case["max_seq_len"], 1024, HEAD_SIZE**-0.5, sliding_window,
        softcap,
    )  # fmt: skip
    return out


def reference_decode(case: dict, sliding_window: int = -1) -> torch.Tensor:
    query = case["query"]
    out = torch.empty(query.shape, dtype=query.dtype)
    reference.decode_attention(
        out, query, case["key_cache"], case["value_cache"], case["block_table"], case["seq_lens"],
        case["max_seq_len"], HEAD_SIZE**-0.5, sliding_window, 0.0,
    )  # fmt: skip
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("sliding_window", [-1, 6])
def test_decode_attention(provider, dtype, block_size, heads, sliding_window):
    case = decode_case(*heads, block_size, dtype)
    got = run_decode(provider, case, sliding_window)
    torch.testing.assert_close(got, reference_decode(case, sliding_window))
    assert calls() == {"speculative_attention": 1}


def prefill_case(
    heads: int,
    kv_heads: int,
    block_size: int,
    dtype: torch.dtype,
    context: Sequence[int] = (0, 21, 5, 40),
    new: Sequence[int] = (9, 4, 1, 13),
) -> dict:
    """Prefill chunks after cached context (0 = fresh prompt), as chunked prefill or prefix hits."""
    seq_lens = [c + n for c, n in zip(context, new, strict=True)]
    table, num_blocks = random_block_table(seq_lens, block_size)
    buffer, key_cache, value_cache = plugin_kv_cache(num_blocks, kv_heads, block_size, dtype)
    query = wide_view(sum(new), heads * HEAD_SIZE, dtype).view(-1, heads, HEAD_SIZE)
    qsl, ssl = lod(new), lod(seq_lens)
    return dict(buffer=buffer, query=query, key_cache=key_cache, value_cache=value_cache,
                block_table=table, query_start_loc=qsl, query_start_loc_cpu=qsl.clone(),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32), seq_start_loc=ssl,
                seq_start_loc_cpu=ssl.clone(), max_query_len=max(new),
                max_seq_len=max(seq_lens))  # fmt: skip


def run_prefill(
    provider: KunlunProvider, case: dict, sliding_window: int = -1, softcap: float = 0.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    c, query = case, case["query"]
    out = torch.empty(query.shape, dtype=query.dtype) if out is None else out
    provider.prefill_attention(
        out, query, c["key_cache"], c["value_cache"], c["block_table"], c["query_start_loc"],
        c["query_start_loc_cpu"], c["seq_lens"], c["seq_start_loc"], c["seq_start_loc_cpu"],
        c["max_query_len"], c["max_seq_len"], HEAD_SIZE**-0.5, sliding_window, softcap,
    )  # fmt: skip
    return out


def reference_prefill(case: dict, sliding_window: int = -1) -> torch.Tensor:
    c, query = case, case["query"]
    out = torch.empty(query.shape, dtype=query.dtype)
    reference.prefill_attention(
        out, query, c["key_cache"], c["value_cache"], c["block_table"], c["query_start_loc"],
        c["seq_lens"], c["max_query_len"], c["max_seq_len"], HEAD_SIZE**-0.5, sliding_window, 0.0,
    )  # fmt: skip
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("sliding_window", [-1, 7])
def test_prefill_attention_with_cached_context(provider, dtype, block_size, heads,
                                               sliding_window):  # fmt: skip
    case = prefill_case(*heads, block_size, dtype)
    got = run_prefill(provider, case, sliding_window)
    torch.testing.assert_close(got, reference_prefill(case, sliding_window))
    assert calls() == {"prefill_attention": 1}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_encoder_attention_uses_the_dense_non_causal_form(provider, dtype, heads):
    num_heads, kv_heads = heads
    lengths = [7, 1, 30, 12]
    qkv = wide_view(sum(lengths), (num_heads + 2 * kv_heads) * HEAD_SIZE, dtype)
    query, key, value = qkv.split([num_heads * HEAD_SIZE, kv_heads * HEAD_SIZE,
                                   kv_heads * HEAD_SIZE], dim=-1)  # fmt: skip
    query, key, value = (t.view(-1, t.shape[-1] // HEAD_SIZE, HEAD_SIZE)
                         for t in (query, key, value))  # fmt: skip
    qsl = lod(lengths)
    got = torch.empty(query.shape, dtype=dtype)
    provider.encoder_attention(got, query, key, value, qsl, qsl.clone(), max(lengths),
                               HEAD_SIZE**-0.5)  # fmt: skip
    expected = torch.empty(query.shape, dtype=dtype)
    reference.encoder_attention(expected, query, key, value, qsl, max(lengths), HEAD_SIZE**-0.5)
    torch.testing.assert_close(got, expected)
    assert calls() == {"prefill_attention": 1}


def test_attention_writes_into_a_non_contiguous_output(provider):
    case = prefill_case(8, 2, 16, torch.float32)
    wide = torch.zeros(case["query"].shape[0], 8, 2 * HEAD_SIZE)
    run_prefill(provider, case, out=wide[..., :HEAD_SIZE])
    torch.testing.assert_close(wide[..., :HEAD_SIZE], reference_prefill(case))
    assert not wide[..., HEAD_SIZE:].any()


def slots_of(table: torch.Tensor, request: int, positions: range, block_size: int) -> torch.Tensor:
    pos = torch.tensor(list(positions))
    return table[request, pos // block_size].long() * block_size + pos % block_size


def with_cache_copy(case: dict) -> dict:
    """The same case on a copy of its KV-cache buffer."""
    buffer = case["buffer"].clone()
    key_cache, value_cache = split_kv_cache(buffer)
    return dict(case, buffer=buffer, key_cache=key_cache, value_cache=value_cache)


def test_cache_write_then_prefill_then_decode_round_trip(provider):
    """One layer over two steps, through the Kunlun provider and the reference kernels."""
    heads, kv_heads, bs, dtype = 8, 2, 16, torch.bfloat16
    case = prefill_case(heads, kv_heads, bs, dtype, context=(0, 0), new=(19, 5))
    ref = with_cache_copy(case)
    table = case["block_table"]

    def write(kv: torch.Tensor, slots: torch.Tensor) -> None:
        provider.reshape_and_cache(*kv, case["key_cache"], case["value_cache"], slots)
        reference.reshape_and_cache(*kv, ref["key_cache"], ref["value_cache"], slots)

    write(
        torch.randn(2, 24, kv_heads, HEAD_SIZE).to(dtype),
        torch.cat([slots_of(table, 0, range(19), bs), slots_of(table, 1, range(5), bs)]),
    )
    torch.testing.assert_close(run_prefill(provider, case), reference_prefill(ref))

    write(
        torch.randn(2, 2, kv_heads, HEAD_SIZE).to(dtype),
        torch.cat([slots_of(table, 0, range(19, 20), bs), slots_of(table, 1, range(5, 6), bs)]),
    )
    lens = torch.tensor([20, 6], dtype=torch.int32)
    step = dict(query=torch.randn(2, heads, HEAD_SIZE).to(dtype), block_table=table,
                seq_lens=lens, seq_lens_cpu=lens.clone(), max_seq_len=20)  # fmt: skip
    got = run_decode(provider, dict(case, **step))
    torch.testing.assert_close(got, reference_decode(dict(ref, **step)))
    assert calls() == {"reshape_and_cache_flash": 2, "prefill_attention": 1,
                       "speculative_attention": 1}  # fmt: skip


def test_separate_contiguous_caches_are_passed_as_they_are(provider):
    case = decode_case(4, 2, 16, torch.float16)
    case.update(key_cache=case["key_cache"].contiguous(),
                value_cache=case["value_cache"].contiguous())  # fmt: skip
    torch.testing.assert_close(run_decode(provider, case), reference_decode(case))


@pytest.mark.parametrize("problem", ["swapped", "transposed"])
def test_other_cache_layouts_are_refused(provider, problem):
    case = decode_case(4, 2, 16, torch.float32)
    k, v = case["key_cache"], case["value_cache"]
    if problem == "swapped":
        case.update(key_cache=v, value_cache=k)
    else:
        case.update(key_cache=k.transpose(2, 3).contiguous().transpose(2, 3), value_cache=v)
    with pytest.raises(ValueError, match="contiguous K and V caches"):
        run_decode(provider, case)


def test_softcap_is_not_implemented(provider):
    with pytest.raises(NotImplementedError, match="soft-capping"):
        run_decode(provider, decode_case(4, 2, 16, torch.float32), softcap=30.0)
    with pytest.raises(NotImplementedError, match="soft-capping"):
        run_prefill(provider, prefill_case(4, 2, 16, torch.float32), softcap=30.0)
    assert calls() == {}


# The stand-in itself: its checks must catch the mistakes they are there for ---------------


def captured_decode_call(
    provider: KunlunProvider, monkeypatch: pytest.MonkeyPatch
) -> tuple[ModuleType, dict]:
    """The keyword arguments the binding passes to speculative_attention for a decode batch."""
    ops = provider.ops
    captured = {}
    monkeypatch.setattr(ops, "speculative_attention", lambda **kwargs: captured.update(kwargs))
    run_decode(provider, decode_case(8, 2, 16, torch.float32))
    monkeypatch.undo()
    return ops, captured


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda kw: kw.update(block_tables=kw["block_tables"].long()), "int32"),
        (lambda kw: kw.update(q=kw["q"].transpose(2, 3).contiguous().transpose(2, 3)),
         "contiguous"),
        (lambda kw: kw.update(context_lens_cpu=kw["context_lens_cpu"] + 1), "different values"),
        (lambda kw: kw.update(out=kw["out"].unsqueeze(0)), "preallocated"),
        (lambda kw: kw.update(block_tables=kw["block_tables"] * 100), "out of range"),
        (lambda kw: kw.pop("max_context_len"), "recorded form"),
    ],
    ids=["int64-block-table", "non-contiguous-q", "host-copy-differs", "4d-out", "bad-block-id",
         "missing-keyword"],
)  # fmt: skip
def test_standin_rejects_contract_violations(provider, monkeypatch, change, message):
    ops, kwargs = captured_decode_call(provider, monkeypatch)
    ops.speculative_attention(**dict(kwargs))  # the binding's own call is accepted
    change(kwargs)
    with pytest.raises(AssertionError, match=message):
        ops.speculative_attention(**kwargs)


def test_standin_rejects_the_other_rmsnorm_form(use_standin):
    ops = use_standin("active")
    x, weight = torch.randn(2, 8), torch.randn(8)
    with pytest.raises(AssertionError, match="recorded form"):
        ops.rmsnorm(x, weight.float(), 1e-6, out=torch.empty_like(x))
    ops = use_standin("legacy")
    with pytest.raises(AssertionError, match="recorded form"):
        ops.rmsnorm(x, weight, torch.empty_like(x), 1e-6)
