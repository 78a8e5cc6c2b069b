"""The MLA family's Kunlun binding (vllm_kunlun/ops/mla/kunlun.py) against the recorded
kunlun_ops API (KUNLUN.md §2d: MLA-specific kernels, the MLA forms of paged_attention and
attention, attention_merge_stage), through the stand-in library (tests/standin): each call is
checked against the recorded contract, and every op must match the reference kernels on the same
inputs. The recorded kernels take DeepSeek-V3's 512 + 64 latent rows only, so those sizes are
used, with few tokens, heads and blocks."""

import inspect
import math

import pytest
import torch

from tests.ops.helpers import DTYPES, TOLERANCES, standin_calls, wide_view
from tests.ops.mla.shared import build_latent_cache, decode_args, lod, prefill_args
from vllm_kunlun.ops.kunlun_library import library
from vllm_kunlun.ops.mla import kunlun as binding
from vllm_kunlun.ops.mla import reference
from vllm_kunlun.ops.provider import Provider

L, R = 512, 64  # kv_lora_rank, rope dims: the recorded kernels' only sizes
WIDTH = L + R
HEADS = 3
NOPE, V_DIM = 128, 128  # DeepSeek-V3's no-rope query/key and value head dims
QK_DIM = NOPE + R  # 192
#: DeepSeek-V3's softmax scale: mscale^2 / sqrt(192), mscale = 0.1 * ln(40) + 1 (YaRN, factor 40).
DEEPSEEK_V3_SCALE = (0.1 * math.log(40) + 1) ** 2 / math.sqrt(QK_DIM)
RECORDED_ALPHA = 1.8738542070926265  # the recorded call's hard-coded alpha


def latent_inputs(tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_c [T, L] and k_pe [T, R]: non-contiguous views, as split out of the kv_a projection."""
    fused = wide_view(tokens, WIDTH, dtype)
    return fused[:, :L], fused[:, L:]


# concat_and_cache_mla --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 64])
def test_concat_and_cache_mla_writes_the_rows(kunlun, dtype, block_size):
    num_blocks, tokens = 4, 7
    kv_cache = torch.randn(num_blocks, block_size, WIDTH).to(dtype)
    want = kv_cache.clone()
    kv_c, k_pe = latent_inputs(tokens, dtype)
    slots = torch.randperm(num_blocks * block_size)[:tokens]  # int64, as vLLM builds it
    slots[2] = -1  # a padding token
    reference.concat_and_cache_mla(kv_c, k_pe, want, slots)
    kunlun.concat_and_cache_mla(kv_c, k_pe, kv_cache, slots)
    assert torch.equal(kv_cache, want)
    assert standin_calls() == {"concat_and_cache_mla": 1}


def test_concat_and_cache_mla_passes_the_recorded_positional_order(kunlun, monkeypatch):
    captured = []
    monkeypatch.setattr(library(), "concat_and_cache_mla", lambda *a, **k: captured.append((a, k)))
    kv_cache = torch.zeros(2, 16, WIDTH)
    kv_c, k_pe = latent_inputs(3, torch.float32)
    slots = torch.tensor([4, -1, 20])
    kunlun.concat_and_cache_mla(kv_c, k_pe, kv_cache, slots)
    (args, kwargs), = captured  # fmt: skip
    assert kwargs == {} and len(args) == 4
    assert torch.equal(args[0], kv_c) and torch.equal(args[1], k_pe)
    assert args[2].dtype == torch.int64 and torch.equal(args[2], slots)  # passed as given
    assert args[3] is kv_cache


# mla_decode ------------------------------------------------------------------------------------


def decode_case(dtype: torch.dtype, block_size: int, seq_lens: list[int], garbage=None):
    cache = build_latent_cache(seq_lens, L, R, block_size, dtype, garbage=garbage)
    query = wide_view(len(seq_lens), HEADS * WIDTH, dtype).view(-1, HEADS, WIDTH)
    return cache, query


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 64])
def test_mla_decode_matches_the_reference(kunlun, dtype, block_size):
    seq_lens = [1, 17, 70]
    cache, query = decode_case(dtype, block_size, seq_lens)
    got = torch.empty(len(seq_lens), HEADS, L, dtype=dtype)
    expected = torch.empty_like(got)
    kunlun.mla_decode(*decode_args(got, query, cache, seq_lens, L, DEEPSEEK_V3_SCALE))
    reference.mla_decode(*decode_args(expected, query, cache, seq_lens, L, DEEPSEEK_V3_SCALE))
    torch.testing.assert_close(got, expected)
    assert standin_calls() == {"paged_attention": 1}


def test_mla_decode_ignores_stale_pages_and_writes_a_non_contiguous_out(kunlun):
    seq_lens = [5, 33]
    cache, query = decode_case(torch.bfloat16, 16, seq_lens, garbage=float("nan"))
    wide = torch.zeros(len(seq_lens), HEADS, L + 8, dtype=torch.bfloat16)
    kunlun.mla_decode(*decode_args(wide[..., :L], query, cache, seq_lens, L, 0.07))
    expected = torch.empty(len(seq_lens), HEADS, L, dtype=torch.bfloat16)
    reference.mla_decode(*decode_args(expected, query, cache, seq_lens, L, 0.07))
    torch.testing.assert_close(wide[..., :L], expected)
    assert not wide[..., L:].any()
    assert not expected.isnan().any()


def test_mla_decode_passes_the_recorded_positional_form(kunlun, monkeypatch):
    captured = []
    monkeypatch.setattr(library(), "paged_attention", lambda *a, **k: captured.append((a, k)))
    seq_lens = [3, 40]
    cache, query = decode_case(torch.float16, 16, seq_lens)
    out = torch.empty(2, HEADS, L, dtype=torch.float16)
    kunlun.mla_decode(*decode_args(out, query, cache, seq_lens, L, 0.1))
    (args, kwargs), = captured  # fmt: skip
    assert len(args) == 13 and set(kwargs) == {"q_r"}
    dst, q, k_cache, v_cache, table, lens_cpu, lens_xpu = args[:7]
    assert dst.shape == (2, 1, HEADS, L) and dst.data_ptr() == out.data_ptr()
    assert q.shape == (2, 1, HEADS, WIDTH) and kwargs["q_r"] is q
    assert k_cache.shape == (cache.kv_cache.shape[0], 1, 16, WIDTH) and v_cache is None
    assert table.dtype == lens_cpu.dtype == lens_xpu.dtype == torch.int32
    assert lens_cpu.tolist() == seq_lens  # per-request lengths, not a lod
    assert args[7:] == (False, True, -1, L, R, 0.1)


# mla_gather_cache ------------------------------------------------------------------------------


def test_mla_gather_cache_names_the_reference(kunlun):
    assert kunlun.sources["mla_gather_cache"] == "mla.reference"
    cache = build_latent_cache([5, 40], L, R, 16, torch.bfloat16)
    gathered = [2, 9]  # rows 0..1 of request 0, 30..38 of request 1
    args = (cache.kv_cache, cache.block_table, lod(gathered),
            torch.tensor([0] * 2 + [1] * 9, dtype=torch.int32),
            torch.tensor([0, 30], dtype=torch.int32))  # fmt: skip
    got = torch.empty(sum(gathered), WIDTH, dtype=torch.bfloat16)
    kunlun.mla_gather_cache(got, *args)
    expected = torch.empty_like(got)
    reference.mla_gather_cache(expected, *args)
    assert torch.equal(got, expected)
    assert torch.equal(got[2:], torch.cat([cache.latent[1], cache.k_pe[1]], -1)[30:39])
    assert standin_calls() == {}


# mla_prefill -----------------------------------------------------------------------------------


def prefill_inputs(tokens: int, keys: int, dtype: torch.dtype):
    """query [T, H, 192] and key [S, H, 192] (non-contiguous), value [S, H, 128] (a slice of the
    up-projected [k_nope | v], as the model splits it)."""
    query = wide_view(tokens, HEADS * QK_DIM, dtype).view(tokens, HEADS, QK_DIM)
    key = wide_view(keys, HEADS * QK_DIM, dtype).view(keys, HEADS, QK_DIM)
    kv = torch.randn(keys, HEADS, NOPE + V_DIM).to(dtype)
    return query, key, kv[..., NOPE:]


def run_prefill(provider_ops, dtype, query_lens, key_lens, causal, with_lse=True,
                scale=DEEPSEEK_V3_SCALE, inputs=None):  # fmt: skip
    query, key, value = inputs or prefill_inputs(sum(query_lens), sum(key_lens), dtype)
    tokens = query.shape[0]
    out = torch.empty(tokens, HEADS, V_DIM, dtype=dtype)
    lse = torch.zeros(HEADS, tokens) if with_lse else None
    provider_ops.mla_prefill(*prefill_args(out, lse, query, key, value, query_lens, key_lens,
                                           scale, causal))  # fmt: skip
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_lse", [True, False], ids=["lse", "no-lse"])
def test_mla_prefill_new_tokens_run_the_attention_kernel(kunlun, dtype, with_lse):
    lengths = [5, 1, 9]
    inputs = prefill_inputs(sum(lengths), sum(lengths), dtype)
    got, got_lse = run_prefill(kunlun, dtype, lengths, lengths, True, with_lse, inputs=inputs)
    expected, expected_lse = run_prefill(reference, dtype, lengths, lengths, True, with_lse,
                                         inputs=inputs)  # fmt: skip
    torch.testing.assert_close(got, expected)
    if with_lse:
        torch.testing.assert_close(got_lse, expected_lse)
    assert standin_calls() == {"attention": 1}


def test_mla_prefill_passes_deepseek_v3s_recorded_alpha(kunlun, monkeypatch):
    captured = {}
    monkeypatch.setattr(library(), "attention", lambda **kwargs: captured.update(kwargs))
    run_prefill(kunlun, torch.bfloat16, [4, 2], [4, 2], True)
    assert captured["alpha"] == pytest.approx(RECORDED_ALPHA, rel=1e-12)
    assert captured["is_causal"] is True and captured["is_prefill"] is True
    q, k, v, out = (captured[name] for name in ("q", "k_cache", "v_cache", "out"))
    assert q.shape == k.shape == v.shape == out.shape == (6, HEADS, QK_DIM)
    assert not v[..., V_DIM:].any()  # V zero-padded to the qk head dim
    lse = captured["softmax_lse"]
    assert lse.shape == (HEADS, 6) and lse.dtype == torch.float32
    assert captured["context_seq_lod_cpu"].tolist() == [0, 4, 6]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("key_lens", "causal"),
    [([16, 7, 3], False), ([5, 1, 9], False), ([8, 4, 9], True)],
    ids=["context-chunk", "non-causal-same-lods", "causal-over-longer-keys"],
)
def test_mla_prefill_other_calls_run_the_reference(kunlun, dtype, key_lens, causal):
    query_lens = [5, 1, 9]
    inputs = prefill_inputs(sum(query_lens), sum(key_lens), dtype)
    got, got_lse = run_prefill(kunlun, dtype, query_lens, key_lens, causal, inputs=inputs)
    expected, expected_lse = run_prefill(reference, dtype, query_lens, key_lens, causal,
                                         inputs=inputs)  # fmt: skip
    assert torch.equal(got, expected) and torch.equal(got_lse, expected_lse)
    assert standin_calls() == {}  # the recorded one-lod form cannot describe these


# merge_attention_states ------------------------------------------------------------------------


def merge_inputs(tokens: int, dtype: torch.dtype):
    prefix_out, suffix_out = (torch.randn(tokens, HEADS, V_DIM).to(dtype) for _ in range(2))
    prefix_lse, suffix_lse = torch.randn(HEADS, tokens) * 3, torch.randn(HEADS, tokens) * 3
    prefix_lse[0, 1] = float("-inf")  # a query that saw no context key
    prefix_lse[1, 2] = suffix_lse[1, 2] = float("-inf")  # and one that saw no key at all
    return prefix_out, prefix_lse, suffix_out, suffix_lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_lse", ["given", "none", "strided"])
def test_merge_attention_states_runs_attention_merge_stage(kunlun, dtype, out_lse):
    tokens = 5  # != HEADS, so an [H, T] / [T, H] mix-up cannot pass
    inputs = merge_inputs(tokens, dtype)
    got = torch.empty(tokens, HEADS, V_DIM, dtype=dtype)
    got_lse = {"given": torch.empty(HEADS, tokens), "none": None,
               "strided": torch.empty(tokens, HEADS).t()}[out_lse]  # fmt: skip
    kunlun.merge_attention_states(got, got_lse, *inputs)
    expected, expected_lse = torch.empty_like(got), torch.empty(HEADS, tokens)
    reference.merge_attention_states(expected, expected_lse, *inputs)
    torch.testing.assert_close(got, expected)
    if got_lse is not None:
        torch.testing.assert_close(got_lse, expected_lse)
    assert standin_calls() == {"attention_merge_stage": 1}


def test_chunked_prefill_composes_to_attention_over_the_whole_sequence(kunlun):
    """Context chunk (reference) + new tokens (attention kernel), merged (attention_merge_stage),
    equals one causal attention over context and new tokens: the LSE conventions agree."""
    dtype, context, new = torch.float32, [10, 6], [4, 3]
    query, _, _ = prefill_inputs(sum(new), 0, dtype)
    keys, values = {}, {}
    for part, lens in (("context", context), ("new", new)):
        _, keys[part], values[part] = prefill_inputs(sum(lens), sum(lens), dtype)
    context_kv = (query, keys["context"], values["context"])
    prefix, prefix_lse = run_prefill(kunlun, dtype, new, context, False, inputs=context_kv)
    new_kv = (query, keys["new"], values["new"])
    suffix, suffix_lse = run_prefill(kunlun, dtype, new, new, True, inputs=new_kv)
    merged = torch.empty_like(prefix)
    kunlun.merge_attention_states(merged, None, prefix, prefix_lse, suffix, suffix_lse)
    assert standin_calls() == {"attention": 1, "attention_merge_stage": 1}

    def per_request(t: dict, lens_a: list[int], lens_b: list[int]) -> torch.Tensor:
        a, b = t["context"].split(lens_a), t["new"].split(lens_b)
        return torch.cat([torch.cat(pair) for pair in zip(a, b, strict=True)])

    whole = [c + n for c, n in zip(context, new, strict=True)]
    expected, _ = run_prefill(reference, dtype, new, whole, True, inputs=(
        query, per_request(keys, context, new), per_request(values, context, new)))  # fmt: skip
    torch.testing.assert_close(merged, expected, **TOLERANCES[dtype])


# Dimensions and the installed library ----------------------------------------------------------


def test_check_mla_dimensions():
    binding.check_mla_dimensions(512, 64)
    for dims in [(32, 16), (512, 32), (256, 64)]:
        with pytest.raises(ValueError, match=r"kv_lora_rank 512 and rope dim 64 only.*"
                           "VLLM_KUNLUN_KERNELS=reference"):  # fmt: skip
            binding.check_mla_dimensions(*dims)


def test_other_latent_sizes_are_not_implemented(kunlun):
    with pytest.raises(NotImplementedError, match="kv_lora_rank 32 and rope dim 16"):
        kunlun.concat_and_cache_mla(torch.randn(2, 32), torch.randn(2, 16),
                                    torch.zeros(2, 16, 48), torch.tensor([0, 1]))  # fmt: skip
    cache = build_latent_cache([3], 32, 16, 16, torch.float32)
    with pytest.raises(NotImplementedError, match="kv_lora_rank 32 and rope dim 16"):
        kunlun.mla_decode(*decode_args(torch.empty(1, 2, 32), torch.randn(1, 2, 48), cache, [3],
                                       32, 0.1))  # fmt: skip
    assert standin_calls() == {}


def without_parameter(fn, name: str):
    """`fn`'s stand-in with `name` removed from its signature."""
    signature = inspect.signature(fn)
    params = [p for p in signature.parameters.values() if p.name != name]

    def replacement(*args, **kwargs) -> None: ...

    replacement.__signature__ = signature.replace(parameters=params)
    return replacement


@pytest.mark.parametrize(
    ("function", "parameter", "message"),
    [("paged_attention", "q_r", "paged_attention does not accept q_r"),
     ("paged_attention", "softmax_scale", "paged_attention takes 12 positional arguments"),
     ("attention", "softmax_lse", "attention does not accept softmax_lse"),
     ("attention_merge_stage", "output_lse", "attention_merge_stage takes 5 positional")],
)  # fmt: skip
def test_load_rejects_a_build_with_other_call_forms(use_standin, monkeypatch, function,
                                                    parameter, message):  # fmt: skip
    ops = use_standin()
    monkeypatch.setattr(ops, function, without_parameter(getattr(ops, function), parameter))
    with pytest.raises(RuntimeError, match=message):
        Provider("kunlun").prepare()


# The stand-in itself: its checks must catch the mistakes they are there for ---------------


def captured_call(monkeypatch, name: str, run) -> tuple[tuple, dict]:
    captured = []
    monkeypatch.setattr(library(), name, lambda *a, **k: captured.append((a, k)))
    run()
    monkeypatch.undo()
    (args, kwargs), = captured  # fmt: skip
    return args, kwargs


def decode_call(kunlun, monkeypatch):
    seq_lens = [3, 40]
    cache, query = decode_case(torch.float32, 16, seq_lens)
    out = torch.empty(2, HEADS, L)
    return captured_call(monkeypatch, "paged_attention", lambda: kunlun.mla_decode(
        *decode_args(out, query, cache, seq_lens, L, 0.1)))  # fmt: skip


def replace(args: tuple, index: int, value) -> tuple:
    return (*args[:index], value, *args[index + 1 :])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a, k: (replace(a, 6, torch.tensor([0, 3, 43], dtype=torch.int32)), k),
         "different values"),
        (lambda a, k: (replace(replace(a, 5, torch.tensor([0, 3, 43], dtype=torch.int32)), 6,
                               torch.tensor([0, 3, 43], dtype=torch.int32)), k),
         "one length per request"),
        (lambda a, k: (replace(a, 4, a[4].long()), k), "int32"),
        (lambda a, k: (a, {"q_r": a[1].clone()}), "q_r must be q"),
        (lambda a, k: (replace(a, 0, a[0][:, 0]), k), "preallocated"),
        (lambda a, k: (replace(a, 2, a[2][:, 0]), k), "4-D"),
        (lambda a, k: (replace(a, 3, a[2]), k), "v_cache=None"),
        (lambda a, k: (a[:-1], k), "recorded form"),
    ],
    ids=["host-copy-differs", "lod-not-lengths", "int64-block-table", "q_r-not-q", "3d-out",
         "3d-cache", "v-cache", "missing-argument"],
)  # fmt: skip
def test_standin_paged_attention_rejects_contract_violations(kunlun, monkeypatch, change,
                                                             message):  # fmt: skip
    args, kwargs = decode_call(kunlun, monkeypatch)
    library().paged_attention(*args, **kwargs)  # the binding's own call is accepted
    args, kwargs = change(args, kwargs)
    with pytest.raises(AssertionError, match=message):
        library().paged_attention(*args, **kwargs)


def prefill_call(kunlun, monkeypatch):
    def run() -> None:
        run_prefill(kunlun, torch.float32, [4, 2], [4, 2], True)

    return captured_call(monkeypatch, "attention", run)[1]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # The recorded context-chunk pairing: query lod on the device, key lod on the host.
        (lambda k: k.update(context_seq_lod_cpu=torch.tensor([0, 9, 11], dtype=torch.int32)),
         "different values"),
        (lambda k: k.update(softmax_lse=k["softmax_lse"].t().contiguous()), "preallocated"),
        (lambda k: k.update(softmax_lse=torch.zeros_like(k["softmax_lse"])), "-inf"),
        (lambda k: k.update(v_cache=k["v_cache"][..., :V_DIM].contiguous()), "like q"),
        (lambda k: k.update(q=k["q"].unsqueeze(0)), "3-D"),
        (lambda k: k.update(alpha=1), "alpha must be a float"),
        (lambda k: k.pop("context_seq_lod_xpu"), "recorded form"),
    ],
    ids=["chunk-pairing", "lse-t-h", "lse-not-neg-inf", "unpadded-v", "4d-q", "int-alpha",
         "missing-keyword"],
)  # fmt: skip
def test_standin_attention_rejects_contract_violations(kunlun, monkeypatch, change, message):
    kwargs = prefill_call(kunlun, monkeypatch)
    library().attention(**{**kwargs, "softmax_lse": kwargs["softmax_lse"].clone()})  # accepted
    change(kwargs)
    with pytest.raises(AssertionError, match=message):
        library().attention(**kwargs)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: replace(a, 1, a[1].t().contiguous()), r"\[H, T\]"),
        (lambda a: replace(a, 4, a[0]), "must not alias"),
        (lambda a: replace(a, 5, None), "output_lse=None"),
        (lambda a: replace(a, 3, a[3].half()), "float32"),
    ],
    ids=["lse-t-h", "output-aliases-prefix", "no-output-lse", "fp16-lse"],
)  # fmt: skip
def test_standin_attention_merge_stage_rejects_contract_violations(kunlun, monkeypatch, change,
                                                                   message):  # fmt: skip
    tokens = 5
    inputs = merge_inputs(tokens, torch.float32)
    out = torch.empty(tokens, HEADS, V_DIM)
    args, _ = captured_call(monkeypatch, "attention_merge_stage",
                            lambda: kunlun.merge_attention_states(out, None, *inputs))  # fmt: skip
    library().attention_merge_stage(*args)
    with pytest.raises(AssertionError, match=message):
        library().attention_merge_stage(*change(args))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: replace(a, 1, a[1].unsqueeze(1)), "2-D"),
        (lambda a: replace(a, 3, a[3].transpose(0, 1)), "contiguous"),
        (lambda a: replace(a, 2, a[2] + 10_000), "out of the cache's range"),
        (lambda a: (a[0], a[1], a[3], a[2]), "must be"),  # the op's order, not the recorded one
    ],
    ids=["3d-k-pe", "strided-cache", "slot-out-of-range", "op-order"],
)  # fmt: skip
def test_standin_concat_and_cache_mla_rejects_contract_violations(kunlun, monkeypatch, change,
                                                                  message):  # fmt: skip
    kv_cache = torch.zeros(2, 16, WIDTH)
    kv_c, k_pe = latent_inputs(3, torch.float32)
    slots = torch.tensor([4, -1, 20])

    def run() -> None:
        kunlun.concat_and_cache_mla(kv_c, k_pe, kv_cache, slots)

    args, _ = captured_call(monkeypatch, "concat_and_cache_mla", run)
    library().concat_and_cache_mla(*args)
    with pytest.raises(AssertionError, match=message):
        library().concat_and_cache_mla(*change(args))
