"""Declaring the ops (vllm_kunlun/ops/declare.py), across every family: each declared op is a
torch custom op `torch.ops.kunlun.<name>` with a correct schema and fake implementation
(`torch.library.opcheck`), runs the chosen provider's kernel, is counted once per call, and every
provider module that implements it takes exactly the declaration's parameters."""

import importlib
import importlib.util
import inspect

import pytest
import torch
from torch.library import opcheck

from tests.ops.attention.shared import attention_op_inputs, decode_op_args, prefill_op_args
from tests.ops.helpers import DTYPES
from tests.ops.mla.shared import mla_op_samples
from tests.ops.rotary.shared import make_cos_sin_cache
from vllm_kunlun.ops import stats
from vllm_kunlun.ops.activation import reference as activation_reference
from vllm_kunlun.ops.attention import reference as attention_reference
from vllm_kunlun.ops.kv_cache import reference as kv_cache_reference
from vllm_kunlun.ops.mla import reference as mla_reference
from vllm_kunlun.ops.norm import reference as norm_reference
from vllm_kunlun.ops.provider import PROVIDERS, declared_ops, families, ops_of
from vllm_kunlun.ops.quant.int4_layout import pack_int4
from vllm_kunlun.ops.rotary import reference as rotary_reference

# Signatures: one contract per op -----------------------------------------------------------


def provider_module(family: str, provider: str):
    name = f"vllm_kunlun.ops.{family}.{provider}"
    return importlib.import_module(name) if importlib.util.find_spec(name) else None


def parameters(fn) -> list[tuple[str, inspect._ParameterKind]]:
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]


def test_the_families_are_the_op_packages():
    assert {"norm", "activation", "rotary", "kv_cache", "attention", "moe", "quant",
            "mla"} <= set(families())  # fmt: skip
    for spec in declared_ops().values():
        assert spec.family in families()
        assert spec.call.__module__ == f"vllm_kunlun.ops.{spec.family}"
    assert "gemma_rms_norm" in ops_of("norm") and "gemma_fused_add_rms_norm" in ops_of("norm")


@pytest.mark.parametrize("family", families())
def test_every_family_has_a_reference_and_a_kunlun_module_defining_every_op(family):
    for provider in ("reference", "kunlun"):
        module = provider_module(family, provider)
        assert module is not None, f"op family {family!r} has no {provider}.py"
        missing = [op for op in ops_of(family) if not callable(getattr(module, op, None))]
        assert not missing, f"{family}/{provider}.py does not define {missing}"


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_provider_modules_take_exactly_the_declared_parameters(provider):
    """Names and kinds, in order: layers call kernels positionally and by keyword alike."""
    checked = 0
    for name, spec in declared_ops().items():
        module = provider_module(spec.family, provider)
        kernel = getattr(module, name, None) if module is not None else None
        if kernel is None:
            continue
        declared = [(p.name, p.kind) for p in spec.signature.parameters.values()]
        assert parameters(kernel) == declared, f"{spec.family}/{provider}.py: {name}"
        checked += 1
    assert checked > 0


def test_the_declared_function_keeps_the_contract():
    for name, spec in declared_ops().items():
        assert spec.call.__name__ == name
        assert inspect.signature(spec.call) == spec.signature
        assert spec.call.__doc__, f"{name} has no docstring"
        assert hasattr(torch.ops.kunlun, name), f"torch.ops.kunlun.{name} is not registered"


# The custom ops run the chosen provider's kernels ----------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_match_reference_norm_activation_rotary(
    reference_ops: None, dtype: torch.dtype
) -> None:
    x = torch.randn(17, 576).to(dtype)
    weight = torch.randn(576).to(dtype)
    assert torch.equal(
        torch.ops.kunlun.rms_norm(x, weight, 1e-6), norm_reference.rms_norm(x, weight, 1e-6)
    )
    assert torch.equal(
        torch.ops.kunlun.gemma_rms_norm(x, weight, 1e-6),
        norm_reference.gemma_rms_norm(x, weight, 1e-6),
    )

    residual = torch.randn(17, 576).to(dtype)
    for op, kernel in [
        (torch.ops.kunlun.fused_add_rms_norm, norm_reference.fused_add_rms_norm),
        (torch.ops.kunlun.gemma_fused_add_rms_norm, norm_reference.gemma_fused_add_rms_norm),
    ]:
        x_op, residual_op = x.clone(), residual.clone()
        x_ref, residual_ref = x.clone(), residual.clone()
        assert op(x_op, residual_op, weight, 1e-6) is None
        kernel(x_ref, residual_ref, weight, 1e-6)
        assert torch.equal(x_op, x_ref) and torch.equal(residual_op, residual_ref)
        assert not torch.equal(x_op, x)  # it did write in place

    gate_up = torch.randn(3, 200).to(dtype)
    assert torch.equal(
        torch.ops.kunlun.silu_and_mul(gate_up), activation_reference.silu_and_mul(gate_up)
    )
    assert torch.equal(
        torch.ops.kunlun.gelu_and_mul(gate_up, "tanh"),
        activation_reference.gelu_and_mul(gate_up, "tanh"),
    )

    for is_neox in (True, False):
        cache = make_cos_sin_cache(256, 32, dtype)
        positions = torch.randint(0, 256, (17,))
        qkv = torch.randn(17, 9 * 80).to(dtype)
        qkv_ref = qkv.clone()
        torch.ops.kunlun.rotary_embedding(
            positions, qkv[:, :480], qkv[:, 480:560], 80, cache, is_neox
        )
        rotary_reference.rotary_embedding(
            positions, qkv_ref[:, :480], qkv_ref[:, 480:560], 80, cache, is_neox
        )
        assert torch.equal(qkv, qkv_ref)
        query_op, query_ref = qkv[:, :480].clone(), qkv[:, :480].clone()
        torch.ops.kunlun.rotary_embedding(positions, query_op, None, 80, cache, is_neox)
        rotary_reference.rotary_embedding(positions, query_ref, None, 80, cache, is_neox)
        assert torch.equal(query_op, query_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_match_reference_kv_cache_and_attention(
    reference_ops: None, dtype: torch.dtype
) -> None:
    key, value = torch.randn(2, 5, 3, 64).to(dtype).unbind(0)
    caches = torch.randn(2, 4, 3, 16, 64).to(dtype)
    slots = torch.tensor([3, -1, 40, 17, 63])
    op_caches, ref_caches = caches.clone(), caches.clone()
    torch.ops.kunlun.reshape_and_cache(key, value, op_caches[0], op_caches[1], slots)
    kv_cache_reference.reshape_and_cache(key, value, ref_caches[0], ref_caches[1], slots)
    assert torch.equal(op_caches, ref_caches) and not torch.equal(op_caches, caches)

    inputs = attention_op_inputs(dtype)
    for window, softcap in [(-1, 0.0), (4, 10.0)]:
        out_op = torch.zeros_like(inputs["decode_query"])
        out_ref = torch.zeros_like(out_op)
        torch.ops.kunlun.decode_attention(*decode_op_args(inputs, out_op, window, softcap))
        attention_reference.decode_attention(*decode_op_args(inputs, out_ref, window, softcap))
        assert torch.equal(out_op, out_ref) and out_op.abs().sum() > 0

        out_op = torch.zeros_like(inputs["prefill_query"])
        out_ref = torch.zeros_like(out_op)
        torch.ops.kunlun.prefill_attention(*prefill_op_args(inputs, out_op, window, softcap))
        attention_reference.prefill_attention(*prefill_op_args(inputs, out_ref, window, softcap))
        assert torch.equal(out_op, out_ref) and out_op.abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_match_reference_mla(reference_ops: None, dtype: torch.dtype) -> None:
    """Every mla op through torch.ops.kunlun writes what the reference writes."""
    for name, args in mla_op_samples(dtype).items():
        op_args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        ref_args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        assert getattr(torch.ops.kunlun, name)(*op_args) is None
        getattr(mla_reference, name)(*ref_args)
        mutated = declared_ops()[name].mutates_args
        names = list(declared_ops()[name].signature.parameters)
        for arg in mutated:
            index = names.index(arg)
            assert torch.equal(op_args[index], ref_args[index]), (name, arg)
        first = op_args[names.index(mutated[0])]
        assert first.isfinite().all() and first.abs().sum() > 0, name


# opcheck -----------------------------------------------------------------------------------------


def op_samples() -> dict[str, tuple]:
    """One valid argument tuple per torch.ops.kunlun op (fresh tensors on every call)."""
    cache = make_cos_sin_cache(64, 32, torch.float32)
    positions, slots = torch.randint(0, 64, (3,)), torch.tensor([5, -1, 60])
    inputs = attention_op_inputs()
    return {
        "rms_norm": (torch.randn(3, 100), torch.randn(100), 1e-6),
        "fused_add_rms_norm": (torch.randn(3, 100), torch.randn(3, 100), torch.randn(100), 1e-6),
        "gemma_rms_norm": (torch.randn(3, 101), torch.randn(101), 1e-6),
        "gemma_fused_add_rms_norm": (
            torch.randn(3, 101),
            torch.randn(3, 101),
            torch.randn(101),
            1e-6,
        ),  # fmt: skip
        "silu_and_mul": (torch.randn(3, 200),),
        # query [T, 4 heads * 64] and key [T, 2 heads * 64]
        "rotary_embedding": (positions, torch.randn(3, 256), torch.randn(3, 128), 64, cache, True),
        # two tokens into a 4-block cache, one padding token
        "reshape_and_cache": (*torch.randn(2, 3, 2, 64), *torch.zeros(2, 4, 2, 16, 64), slots),
        "decode_attention": decode_op_args(
            inputs, torch.empty_like(inputs["decode_query"]), -1, 0.0
        ),
        "prefill_attention": prefill_op_args(
            inputs, torch.empty_like(inputs["prefill_query"]), 8, 20.0
        ),
        "gelu_and_mul": (torch.randn(3, 200), "tanh"),
        # 4 query heads over 2 kv heads of 64, sequences of 3 and 1 tokens
        "encoder_attention": (
            torch.empty(4, 4, 64),
            torch.randn(4, 4, 64),
            *torch.randn(2, 4, 2, 64),
            torch.tensor([0, 3, 4]),
            torch.tensor([0, 3, 4]),
            3,
            0.125,
        ),  # fmt: skip
        "moe_softmax_topk": (torch.randn(3, 8), 2, True),
        # 16 experts in 4 groups, the best 2 groups, DeepSeek-style bias and scaling
        "moe_grouped_topk": (torch.randn(3, 16), 4, True, 4, 2, "sigmoid", torch.rand(16), 2.5),
        # 3 tokens of 32, 4 experts of intermediate size 24, top 2
        "moe_experts": (
            torch.randn(3, 32),
            torch.randn(4, 48, 32),
            torch.randn(4, 32, 24),
            torch.rand(3, 2),
            torch.tensor([[0, 3], [1, 0], [2, 3]], dtype=torch.int32),
            None,
            "silu",
            False,
        ),  # fmt: skip
        # the same with int8 weights and their per-channel absmax, token 1 on experts 2 and 0
        "moe_experts_w8a8": (
            torch.randn(3, 32),
            torch.randint(-127, 128, (4, 48, 32), dtype=torch.int8),
            torch.rand(4, 48) + 0.5,
            torch.randint(-127, 128, (4, 32, 24), dtype=torch.int8),
            torch.rand(4, 32) + 0.5,
            torch.rand(3, 2),
            torch.tensor([[0, 3], [2, 0], [2, 3]], dtype=torch.int32),
            None,
            "silu",
            False,
        ),  # fmt: skip
        # the same with packed int4 experts: w13 [4, 32, 48 / 8] in 2 groups, w2 [4, 24, 32 / 8]
        # in 1, scales in another dtype than x, an expert map (global expert 1 on another rank)
        "moe_experts_wna16": (
            torch.randn(3, 32),
            pack_int4(torch.randint(0, 16, (4, 32, 48))),
            (torch.rand(4, 2, 48) * 0.05 + 0.01).to(torch.bfloat16),
            pack_int4(torch.randint(0, 16, (4, 2, 48))),
            pack_int4(torch.randint(0, 16, (4, 24, 32))),
            (torch.rand(4, 1, 32) * 0.05 + 0.01).to(torch.bfloat16),
            pack_int4(torch.randint(0, 16, (4, 1, 32))),
            torch.rand(3, 2),
            torch.tensor([[0, 3], [1, 0], [2, 3]], dtype=torch.int32),
            torch.tensor([3, -1, 0, 1], dtype=torch.int32),
            "silu",
            False,
        ),  # fmt: skip
        "int8_quant_per_token": (torch.randn(2, 3, 40),),
        "int8_quant_static": (
            torch.randn(3, 40),
            torch.tensor([0.02]),
            torch.tensor([-3], dtype=torch.int32),
        ),  # fmt: skip
        # 3 tokens of 40 -> 7 channels, per-token absmax, bias, bf16 out
        "int8_scaled_mm": (
            torch.randint(-127, 128, (3, 40), dtype=torch.int8),
            torch.rand(3, 1) + 0.5,
            torch.randint(-127, 128, (7, 40), dtype=torch.int8),
            torch.rand(7) + 0.5,
            None,
            torch.randn(7),
            torch.bfloat16,
        ),  # fmt: skip
        # 3 tokens of 64 -> 40 channels in 2 groups, act-order, bias
        "wna16_gemm": (
            torch.randn(3, 64),
            pack_int4(torch.randint(0, 16, (64, 40))),
            torch.rand(2, 40) + 0.01,
            pack_int4(torch.randint(0, 16, (2, 40))),
            torch.randperm(64),
            torch.randn(40),
        ),  # fmt: skip
        "wna16_dequant": (
            pack_int4(torch.randint(0, 16, (64, 40))),
            (torch.rand(2, 40) + 0.01).to(torch.bfloat16),
            pack_int4(torch.randint(0, 16, (2, 40))),
        ),  # fmt: skip
        # 3 tokens of 64 -> 37 channels, uint8 weights in 2 groups, scales in another dtype
        # than x, act-order, bias
        "w8a16_gemm": (
            torch.randn(3, 64),
            torch.randint(0, 256, (64, 37), dtype=torch.uint8),
            (torch.rand(2, 37) * 0.002 + 0.0002).to(torch.bfloat16),
            torch.randint(0, 256, (2, 37), dtype=torch.uint8),
            torch.randperm(64),
            torch.randn(37),
        ),  # fmt: skip
        # MLA: latent 32 + 16, 3 heads, block size 16 (tests/ops/mla/shared.py)
        **mla_op_samples(),
    }


OPCHECK_CASES = [
    "rms_norm",
    "fused_add_rms_norm",
    "silu_and_mul",
    "rotary_embedding",
    "reshape_and_cache",
    "decode_attention",
    "prefill_attention",
    "gelu_and_mul",
    "encoder_attention",
    "gemma_rms_norm",
    "gemma_fused_add_rms_norm",
    "moe_softmax_topk",
    "moe_grouped_topk",
    "moe_experts",
    "moe_experts_w8a8",
    "moe_experts_wna16",
    "int8_quant_per_token",
    "int8_quant_static",
    "int8_scaled_mm",
    "wna16_gemm",
    "wna16_dequant",
    "w8a16_gemm",
    "concat_and_cache_mla",
    "mla_decode",
    "mla_gather_cache",
    "mla_prefill",
    "merge_attention_states",
]


def test_every_declared_op_has_an_opcheck_case():
    assert set(OPCHECK_CASES) == set(op_samples()) == set(declared_ops())


@pytest.mark.parametrize("name", OPCHECK_CASES)
def test_opcheck(reference_ops: None, name: str) -> None:
    """All of opcheck's default checks: schema (declared mutations), fake implementation,
    autograd registration and AOT dispatch."""
    opcheck(getattr(torch.ops.kunlun, name).default, op_samples()[name])


@pytest.mark.parametrize("is_neox", [True, False])
def test_opcheck_rotary_embedding_without_key(reference_ops: None, is_neox: bool) -> None:
    cache = make_cos_sin_cache(64, 16, torch.bfloat16)
    query = torch.randn(5, 3 * 32).to(torch.bfloat16)
    args = (torch.randint(0, 64, (5,)), query, None, 32, cache, is_neox)
    opcheck(torch.ops.kunlun.rotary_embedding.default, args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_opcheck_norms_and_activation_low_precision(
    reference_ops: None, dtype: torch.dtype
) -> None:
    x, residual = torch.randn(2, 2, 3, 100).to(dtype).unbind(0)
    weight = torch.randn(100).to(dtype)
    opcheck(torch.ops.kunlun.rms_norm.default, (x, weight, 1e-5))
    opcheck(torch.ops.kunlun.fused_add_rms_norm.default, (x, residual, weight, 1e-5))
    opcheck(torch.ops.kunlun.gemma_rms_norm.default, (x, weight, 1e-5))
    opcheck(torch.ops.kunlun.gemma_fused_add_rms_norm.default, (x, residual, weight, 1e-5))
    opcheck(torch.ops.kunlun.silu_and_mul.default, (torch.randn(2, 3, 200).to(dtype),))


# Fake and real implementations must agree on dtype and strides in these corner cases too
# (both once disagreed). Only test_faketensor is about that; the other checks run above.


def test_opcheck_rms_norm_with_float32_weight(reference_ops: None) -> None:
    x, weight = torch.randn(3, 16).to(torch.bfloat16), torch.randn(16)
    opcheck(torch.ops.kunlun.rms_norm.default, (x, weight, 1e-6), test_utils=("test_faketensor",))
    opcheck(torch.ops.kunlun.gemma_rms_norm.default, (x, weight, 1e-6),
            test_utils=("test_faketensor",))  # fmt: skip


def test_opcheck_silu_and_mul_transposed_input(reference_ops: None) -> None:
    x = torch.randn(64, 3).t()
    opcheck(torch.ops.kunlun.silu_and_mul.default, (x,), test_utils=("test_faketensor",))


# Op accounting -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPCHECK_CASES)
def test_each_op_call_is_counted_once(reference_ops: None, name: str) -> None:
    args = op_samples()[name]
    before = stats.snapshot()
    getattr(torch.ops.kunlun, name)(*args)
    after = stats.snapshot()
    assert after.get(name, 0) == before.get(name, 0) + 1
    assert {k: v for k, v in after.items() if k != name} == {
        k: v for k, v in before.items() if k != name
    }
    getattr(torch.ops.kunlun, name)(*op_samples()[name])
    assert stats.snapshot().get(name, 0) == before.get(name, 0) + 2


@pytest.mark.parametrize("name", OPCHECK_CASES)
def test_the_declared_function_is_counted_like_the_custom_op(reference_ops: None, name: str):
    """Layers call the declared function (eager: the kernel directly, no dispatcher)."""
    before = stats.snapshot().get(name, 0)
    declared_ops()[name].call(*op_samples()[name])
    assert stats.snapshot().get(name, 0) == before + 1


def test_reference_calls_are_not_counted() -> None:
    """Only the declared entry points count; the kernels themselves do not."""
    before = stats.snapshot()
    norm_reference.rms_norm(torch.randn(2, 8), torch.randn(8), 1e-6)
    activation_reference.silu_and_mul(torch.randn(2, 8))
    assert stats.snapshot() == before
