"""Host syncs per call, counted at the aten level by the dispatch-mode counter check-kernels
uses: the KV writes (dense and MLA), decode attention (dense and MLA) and the W8A8 quantization
and GEMM must never make the host wait for the device (a stall per layer on an accelerator, and a
call no device graph can capture); the prefill path's ops make none either."""

import pytest
import torch

from vllm_kunlun.ops.check.runner import cases_by_op
from vllm_kunlun.ops.check.syncs import HostSyncCounter
from vllm_kunlun.ops.provider import Provider, declared_ops

ZERO_SYNC_OPS = ("reshape_and_cache", "decode_attention", "int8_quant_per_token",
                 "int8_quant_static", "int8_scaled_mm", "wna16_gemm", "wna16_dequant",
                 "w8a16_gemm", "concat_and_cache_mla", "mla_decode")  # fmt: skip
#: Ops of the prefill path (one call per layer per prefill step, not captured in graphs).
PREFILL_PATH_OPS = ("prefill_attention", "encoder_attention", "mla_prefill", "mla_gather_cache",
                    "merge_attention_states")  # fmt: skip


def test_the_counter_sees_each_kind_of_host_sync():
    x = torch.arange(6.0)
    with HostSyncCounter() as counter:
        x.sum().item()
        bool(x.any())
        x[x > 2]
        torch.nonzero(x)
        torch.repeat_interleave(torch.tensor([1, 2]))
    assert counter.by_op["_local_scalar_dense"] == 2
    assert counter.by_op["index"] == 1
    assert counter.by_op["nonzero"] == 1
    assert counter.by_op["repeat_interleave"] == 1
    assert counter.total == 5


def test_the_counter_ignores_sync_free_equivalents():
    x = torch.arange(6.0)
    with HostSyncCounter() as counter:
        torch.where(x > 2, x, 0.0)
        torch.repeat_interleave(torch.arange(2), torch.tensor([1, 2]), output_size=3)
        x[torch.tensor([0, 3])]
        x.masked_fill(x > 2, 0.0)
    assert counter.total == 0


@pytest.mark.parametrize("provider_name", ["reference", "compiled"])
@pytest.mark.parametrize("op", ZERO_SYNC_OPS)
def test_no_host_sync_per_call(provider_name, op):
    provider = Provider(provider_name).prepare()
    spec = declared_ops()[op]
    checked = 0
    for case in cases_by_op()[op]:
        if case.big:
            continue
        for dtype in (torch.float32, torch.bfloat16):
            args = case.make(dtype, torch.device("cpu"), torch.Generator().manual_seed(0))
            with HostSyncCounter() as counter:
                provider.kernel(op)(*args)
            assert counter.total == 0, f"{op} {case.name} {dtype}: {dict(counter.by_op)}"
            checked += 1
    assert checked >= 8
    assert spec.family in ("kv_cache", "attention", "quant", "mla")


@pytest.mark.parametrize("op", PREFILL_PATH_OPS)
def test_prefill_path_ops_are_sync_free_too(op):
    provider = Provider("reference")
    checked = 0
    for case in cases_by_op()[op]:
        if case.big:
            continue
        args = case.make(torch.float32, torch.device("cpu"), torch.Generator().manual_seed(1))
        with HostSyncCounter() as counter:
            provider.kernel(op)(*args)
        assert counter.total == 0, f"{op} {case.name}: {dict(counter.by_op)}"
        checked += 1
    assert checked >= 3


def test_padding_slots_are_skipped_without_reading_them_back():
    """The sync-free KV write still leaves every slot but the real tokens' untouched."""
    from vllm_kunlun.ops.kv_cache.reference import reshape_and_cache

    key_cache = torch.randn(4, 2, 16, 8)
    value_cache = torch.randn(4, 2, 16, 8)
    before_k, before_v = key_cache.clone(), value_cache.clone()
    key, value = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    slots = torch.tensor([-1, 17, -1, 63])
    with HostSyncCounter() as counter:
        reshape_and_cache(key, value, key_cache, value_cache, slots)
    assert counter.total == 0
    expected_k, expected_v = before_k.clone(), before_v.clone()
    for token, slot in ((1, 17), (3, 63)):
        expected_k[slot // 16, :, slot % 16] = key[token]
        expected_v[slot // 16, :, slot % 16] = value[token]
    assert torch.equal(key_cache, expected_k)
    assert torch.equal(value_cache, expected_v)
    reshape_and_cache(key, value, key_cache, value_cache, torch.tensor([-1, -1, -1, -1]))
    assert torch.equal(key_cache, expected_k) and torch.equal(value_cache, expected_v)
