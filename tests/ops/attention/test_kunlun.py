"""The attention family's Kunlun binding (vllm_kunlun/ops/attention/kunlun.py) against the
recorded kunlun_ops API (KUNLUN.md §2d, §3), through the stand-in library (tests/standin): each
call is checked against the recorded contract, and decode, prefill and encoder attention must
match the reference kernels on the plugin's real KV-cache layout. This is all the verification
the binding has until it runs on a Kunlun XPU."""

import inspect
import math
from collections.abc import Sequence
from types import ModuleType

import pytest
import torch

from tests.ops.attention.shared import lod
from tests.ops.helpers import DTYPES, standin_calls, wide_view
from tests.ops.kv_cache.shared import kv_page_views, plugin_kv_cache
from vllm_kunlun.ops.attention import reference
from vllm_kunlun.ops.kunlun_library import library
from vllm_kunlun.ops.kv_cache import reference as kv_cache_reference
from vllm_kunlun.ops.provider import Provider

HEADS = [(4, 4), (8, 2), (4, 1)]  # (query heads, kv heads): MHA, GQA, MQA
HEAD_SIZE = 32


def test_load_rejects_a_build_without_max_window_size(use_standin, monkeypatch):
    ops = use_standin()
    older = inspect.signature(ops.speculative_attention)
    params = [p for p in older.parameters.values() if p.name != "max_window_size"]

    def speculative_attention(**kwargs) -> None: ...

    speculative_attention.__signature__ = older.replace(parameters=params)
    monkeypatch.setattr(ops, "speculative_attention", speculative_attention)
    with pytest.raises(RuntimeError, match="speculative_attention does not accept max_window"):
        Provider("kunlun").prepare()


# Cases ---------------------------------------------------------------------------------------


def random_block_table(seq_lens: list[int], block_size: int) -> tuple[torch.Tensor, int]:
    """Distinct random blocks per request, one spare column; returns (table, num_blocks)."""
    width = math.ceil(max(seq_lens) / block_size) + 1
    num_blocks = len(seq_lens) * width + 3
    ids = torch.randperm(num_blocks)[: len(seq_lens) * width]
    return ids.view(len(seq_lens), width).to(torch.int32), num_blocks


def decode_case(
    heads: int, kv_heads: int, block_size: int, dtype: torch.dtype,
    seq_lens: Sequence[int] = (1, 17, 40, 33, 9),
) -> dict:  # fmt: skip
    seq_lens = list(seq_lens)
    table, num_blocks = random_block_table(seq_lens, block_size)
    _, key_cache, value_cache = plugin_kv_cache(num_blocks, kv_heads, block_size, HEAD_SIZE,
                                                dtype)  # fmt: skip
    query = wide_view(len(seq_lens), heads * HEAD_SIZE, dtype).view(-1, heads, HEAD_SIZE)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return dict(query=query, key_cache=key_cache, value_cache=value_cache, block_table=table,
                seq_lens=lens, seq_lens_cpu=lens.clone(), max_seq_len=max(seq_lens))  # fmt: skip


def decode_args(case: dict, out: torch.Tensor, sliding_window: int, softcap: float) -> tuple:
    """decode_attention's arguments, in the op's order."""
    return (
        out, case["query"], case["key_cache"], case["value_cache"], case["block_table"],
        case["seq_lens"], case["seq_lens_cpu"], case["max_seq_len"], 1024, HEAD_SIZE**-0.5,
        sliding_window, softcap,
    )  # fmt: skip


def run_decode(
    kunlun: Provider, case: dict, sliding_window: int = -1, softcap: float = 0.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    query = case["query"]
    out = torch.empty(query.shape, dtype=query.dtype) if out is None else out
    kunlun.decode_attention(*decode_args(case, out, sliding_window, softcap))
    return out


def reference_decode(case: dict, sliding_window: int = -1) -> torch.Tensor:
    query = case["query"]
    out = torch.empty(query.shape, dtype=query.dtype)
    reference.decode_attention(*decode_args(case, out, sliding_window, 0.0))
    return out


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
    buffer, key_cache, value_cache = plugin_kv_cache(num_blocks, kv_heads, block_size, HEAD_SIZE,
                                                     dtype)  # fmt: skip
    query = wide_view(sum(new), heads * HEAD_SIZE, dtype).view(-1, heads, HEAD_SIZE)
    qsl, ssl = lod(list(new)), lod(seq_lens)
    return dict(buffer=buffer, query=query, key_cache=key_cache, value_cache=value_cache,
                block_table=table, query_start_loc=qsl, query_start_loc_cpu=qsl.clone(),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32), seq_start_loc=ssl,
                seq_start_loc_cpu=ssl.clone(), max_query_len=max(new),
                max_seq_len=max(seq_lens))  # fmt: skip


def prefill_args(case: dict, out: torch.Tensor, sliding_window: int, softcap: float) -> tuple:
    """prefill_attention's arguments, in the op's order."""
    c = case
    return (
        out, c["query"], c["key_cache"], c["value_cache"], c["block_table"], c["query_start_loc"],
        c["query_start_loc_cpu"], c["seq_lens"], c["seq_start_loc"], c["seq_start_loc_cpu"],
        c["max_query_len"], c["max_seq_len"], HEAD_SIZE**-0.5, sliding_window, softcap,
    )  # fmt: skip


def run_prefill(
    kunlun: Provider, case: dict, sliding_window: int = -1, softcap: float = 0.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    query = case["query"]
    out = torch.empty(query.shape, dtype=query.dtype) if out is None else out
    kunlun.prefill_attention(*prefill_args(case, out, sliding_window, softcap))
    return out


def reference_prefill(case: dict, sliding_window: int = -1) -> torch.Tensor:
    query = case["query"]
    out = torch.empty(query.shape, dtype=query.dtype)
    reference.prefill_attention(*prefill_args(case, out, sliding_window, 0.0))
    return out


# Decode, prefill and encoder attention ---------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("sliding_window", [-1, 6])
def test_decode_attention(kunlun, dtype, block_size, heads, sliding_window):
    case = decode_case(*heads, block_size, dtype)
    got = run_decode(kunlun, case, sliding_window)
    torch.testing.assert_close(got, reference_decode(case, sliding_window))
    assert standin_calls() == {"speculative_attention": 1}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("sliding_window", [-1, 7])
def test_prefill_attention_with_cached_context(kunlun, dtype, block_size, heads,
                                               sliding_window):  # fmt: skip
    case = prefill_case(*heads, block_size, dtype)
    got = run_prefill(kunlun, case, sliding_window)
    torch.testing.assert_close(got, reference_prefill(case, sliding_window))
    assert standin_calls() == {"prefill_attention": 1}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_encoder_attention_uses_the_dense_non_causal_form(kunlun, dtype, heads):
    num_heads, kv_heads = heads
    lengths = [7, 1, 30, 12]
    qkv = wide_view(sum(lengths), (num_heads + 2 * kv_heads) * HEAD_SIZE, dtype)
    query, key, value = qkv.split([num_heads * HEAD_SIZE, kv_heads * HEAD_SIZE,
                                   kv_heads * HEAD_SIZE], dim=-1)  # fmt: skip
    query, key, value = (t.view(-1, t.shape[-1] // HEAD_SIZE, HEAD_SIZE)
                         for t in (query, key, value))  # fmt: skip
    qsl = lod(lengths)
    got = torch.empty(query.shape, dtype=dtype)
    kunlun.encoder_attention(got, query, key, value, qsl, qsl.clone(), max(lengths),
                             HEAD_SIZE**-0.5)  # fmt: skip
    expected = torch.empty(query.shape, dtype=dtype)
    reference.encoder_attention(expected, query, key, value, qsl, qsl.clone(), max(lengths),
                                HEAD_SIZE**-0.5)  # fmt: skip
    torch.testing.assert_close(got, expected)
    assert standin_calls() == {"prefill_attention": 1}


def test_attention_writes_into_a_non_contiguous_output(kunlun):
    case = prefill_case(8, 2, 16, torch.float32)
    wide = torch.zeros(case["query"].shape[0], 8, 2 * HEAD_SIZE)
    run_prefill(kunlun, case, out=wide[..., :HEAD_SIZE])
    torch.testing.assert_close(wide[..., :HEAD_SIZE], reference_prefill(case))
    assert not wide[..., HEAD_SIZE:].any()


def slots_of(table: torch.Tensor, request: int, positions: range, block_size: int) -> torch.Tensor:
    pos = torch.tensor(list(positions))
    return table[request, pos // block_size].long() * block_size + pos % block_size


def with_cache_copy(case: dict) -> dict:
    """The same case on a copy of its KV-cache buffer."""
    buffer = case["buffer"].clone()
    key_cache, value_cache = kv_page_views(buffer)
    return dict(case, buffer=buffer, key_cache=key_cache, value_cache=value_cache)


def test_cache_write_then_prefill_then_decode_round_trip(kunlun):
    """One layer over two steps, through the Kunlun provider and the reference kernels."""
    heads, kv_heads, bs, dtype = 8, 2, 16, torch.bfloat16
    case = prefill_case(heads, kv_heads, bs, dtype, context=(0, 0), new=(19, 5))
    ref = with_cache_copy(case)
    table = case["block_table"]

    def write(kv: torch.Tensor, slots: torch.Tensor) -> None:
        kunlun.reshape_and_cache(*kv, case["key_cache"], case["value_cache"], slots)
        kv_cache_reference.reshape_and_cache(*kv, ref["key_cache"], ref["value_cache"], slots)

    write(
        torch.randn(2, 24, kv_heads, HEAD_SIZE).to(dtype),
        torch.cat([slots_of(table, 0, range(19), bs), slots_of(table, 1, range(5), bs)]),
    )
    torch.testing.assert_close(run_prefill(kunlun, case), reference_prefill(ref))

    write(
        torch.randn(2, 2, kv_heads, HEAD_SIZE).to(dtype),
        torch.cat([slots_of(table, 0, range(19, 20), bs), slots_of(table, 1, range(5, 6), bs)]),
    )
    lens = torch.tensor([20, 6], dtype=torch.int32)
    step = dict(query=torch.randn(2, heads, HEAD_SIZE).to(dtype), block_table=table,
                seq_lens=lens, seq_lens_cpu=lens.clone(), max_seq_len=20)  # fmt: skip
    got = run_decode(kunlun, dict(case, **step))
    torch.testing.assert_close(got, reference_decode(dict(ref, **step)))
    assert standin_calls() == {"reshape_and_cache_flash": 2, "prefill_attention": 1,
                               "speculative_attention": 1}  # fmt: skip


def test_separate_contiguous_caches_are_passed_as_they_are(kunlun):
    case = decode_case(4, 2, 16, torch.float16)
    case.update(key_cache=case["key_cache"].contiguous(),
                value_cache=case["value_cache"].contiguous())  # fmt: skip
    torch.testing.assert_close(run_decode(kunlun, case), reference_decode(case))


@pytest.mark.parametrize("problem", ["swapped", "transposed"])
def test_other_cache_layouts_are_refused(kunlun, problem):
    case = decode_case(4, 2, 16, torch.float32)
    k, v = case["key_cache"], case["value_cache"]
    if problem == "swapped":
        case.update(key_cache=v, value_cache=k)
    else:
        case.update(key_cache=k.transpose(2, 3).contiguous().transpose(2, 3), value_cache=v)
    with pytest.raises(ValueError, match="contiguous K and V caches"):
        run_decode(kunlun, case)


def test_softcap_is_not_implemented(kunlun):
    with pytest.raises(NotImplementedError, match="soft-capping"):
        run_decode(kunlun, decode_case(4, 2, 16, torch.float32), softcap=30.0)
    with pytest.raises(NotImplementedError, match="soft-capping"):
        run_prefill(kunlun, prefill_case(4, 2, 16, torch.float32), softcap=30.0)
    assert standin_calls() == {}


# The stand-in itself: its checks must catch the mistakes they are there for ---------------


def captured_decode_call(
    kunlun: Provider, monkeypatch: pytest.MonkeyPatch
) -> tuple[ModuleType, dict]:
    """The keyword arguments the binding passes to speculative_attention for a decode batch."""
    ops = library()
    captured = {}
    monkeypatch.setattr(ops, "speculative_attention", lambda **kwargs: captured.update(kwargs))
    run_decode(kunlun, decode_case(8, 2, 16, torch.float32))
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
def test_standin_rejects_contract_violations(kunlun, monkeypatch, change, message):
    ops, kwargs = captured_decode_call(kunlun, monkeypatch)
    ops.speculative_attention(**dict(kwargs))  # the binding's own call is accepted
    change(kwargs)
    with pytest.raises(AssertionError, match=message):
        ops.speculative_attention(**kwargs)
