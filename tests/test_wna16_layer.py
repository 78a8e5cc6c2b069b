"""The plugin's weight-only linear kernel (vllm_kunlun.quantization.wna16_linear) on layers built
by vLLM's own methods, without an engine: GPTQ (`AutoGPTQLinearMethod`'s parameters, through
the plugin's KunlunGPTQLinearMethod; 4-bit, act-order, and 8-bit), AWQ (KunlunAWQLinearMethod,
vLLM's AWQ conversion) and compressed-tensors W4A16 and W8A16 (`CompressedTensorsWNA16`,
symmetric and with zero points). Each layer is filled with random values packed here the way
each format packs them, and must give the plain formula x @ ((q - z) * s) in float64. The
engine tests are in tests/test_quantized_models.py."""

import pytest
import torch
from torch import nn
from vllm.model_executor import parameter
from vllm.model_executor.layers.quantization import auto_awq, auto_gptq
from vllm.model_executor.layers.quantization.compressed_tensors.schemes import (
    compressed_tensors_wNa16,
)
from vllm.model_executor.layers.quantization.compressed_tensors.schemes.compressed_tensors_wNa16 import (  # noqa: E501
    CompressedTensorsWNA16,
)

from vllm_kunlun.ops import stats
from vllm_kunlun.quantization import plugin_linear_kernel
from vllm_kunlun.quantization.gptq_awq import (
    KunlunAWQConfig,
    KunlunAWQLinearMethod,
    KunlunGPTQConfig,
    KunlunGPTQLinearMethod,
)
from vllm_kunlun.quantization.wna16_linear import KunlunWNA16LinearKernel

#: AWQ's packing: slot i of a word holds channel 8c + AWQ_ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
FORMATS = ("gptq", "awq", "w4a16", "w4a16-asym")


@pytest.fixture(autouse=True)
def plugin_kernel_is_chosen(monkeypatch):
    """This process runs vLLM's CPU platform, whose mixed-precision list has vLLM's CPU kernel;
    on a Kunlun platform the list holds the plugin's kernel (checked by the engine tests)."""
    for module in (auto_gptq, auto_awq, compressed_tensors_wNa16):
        monkeypatch.setattr(module, "choose_mp_linear_kernel", lambda c: KunlunWNA16LinearKernel)
    # vLLM's parameters read the tensor-parallel rank when created: one rank, no process group.
    monkeypatch.setattr(parameter, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(parameter, "get_tensor_model_parallel_world_size", lambda: 1)


def pack_words(values: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """[..., 8m] unsigned 4-bit values -> int32 [..., m], slot i of a word = value order[i]."""
    words = values.long().unflatten(-1, (-1, 8))[..., list(order)]
    packed = sum(words[..., i] << (4 * i) for i in range(8))
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def random_weights(depth: int, channels: int, groups: int, symmetric: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (depth, channels), generator=g)
    q[0, :8] = torch.tensor([0, 15, 0, 15, 8, 7, 1, 14])  # the range's ends
    scales = torch.rand(groups, channels, generator=g) * 0.02 + 0.001
    zeros = (torch.full((groups, channels), 8) if symmetric
             else torch.randint(0, 16, (groups, channels), generator=g))  # fmt: skip
    return q, scales, zeros


def build(fmt: str, depth: int, channels: int, group_size: int, dtype: torch.dtype):
    """A layer as vLLM's method for `fmt` creates it, filled in the format's packing, and the
    (q [K, N], scales [G, N], zeros [G, N]) it holds."""
    groups = depth // group_size if group_size != -1 else 1
    q, scales, zeros = random_weights(depth, channels, groups, fmt in ("gptq", "w4a16"))
    layer = nn.Module()
    sizes = dict(input_size_per_partition=depth, output_partition_sizes=[channels],
                 input_size=depth, output_size=channels, params_dtype=dtype)  # fmt: skip
    if fmt == "gptq":
        config = KunlunGPTQConfig(4, group_size, False, True, False, {}, {})
        method = KunlunGPTQLinearMethod(config)
        method.create_weights(layer, **sizes, weight_loader=None)
        layer.qweight.data = pack_words(q.t()).t().contiguous()  # packed along K: [K/8, N]
        layer.qzeros.data = pack_words(zeros - 1)  # GPTQ v1 stores zero - 1 (ignored: symmetric)
        layer.scales.data = scales.to(dtype)
    elif fmt == "awq":
        config = KunlunAWQConfig(4, group_size, True, False)
        method = KunlunAWQLinearMethod(config)
        method.create_weights(layer, **sizes, weight_loader=None)
        layer.qweight.data = pack_words(q, AWQ_ORDER)  # packed along N: [K, N/8]
        layer.qzeros.data = pack_words(zeros, AWQ_ORDER)
        layer.scales.data = scales.to(dtype)
    else:
        symmetric = fmt == "w4a16"
        strategy = "group" if group_size != -1 else "channel"
        method = CompressedTensorsWNA16(strategy, 4, group_size if group_size != -1 else None,
                                        symmetric=symmetric, layer_name="layer")  # fmt: skip
        method.create_weights(layer, weight_loader=None, **sizes)
        layer.weight_packed.data = pack_words(q.t())  # [N, K/8]
        layer.weight_scale.data = scales.t().contiguous().to(dtype)  # [N, G]
        if not symmetric:
            layer.weight_zero_point.data = pack_words(zeros.t().contiguous().t()).t().contiguous()
    layer.bias = None
    method.process_weights_after_loading(layer)
    return layer, method, (q, scales.to(dtype), zeros)


def forward(method, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A linear method's apply, or a compressed-tensors scheme's apply_weights."""
    if isinstance(method, CompressedTensorsWNA16):
        return method.apply_weights(layer, x, None)
    return method.apply(layer, x)


def plain_wna16(x: torch.Tensor, q, scales, zeros) -> torch.Tensor:
    group_size = q.shape[0] // scales.shape[0]
    rows = torch.arange(q.shape[0]) // group_size
    weight = (q.double() - zeros[rows].double()) * scales[rows].double()
    return x.double() @ weight


CASES = {"one group per 32 rows": (64, 48, 32), "one group": (96, 40, -1),
         "three groups of 32": (96, 16, 32)}  # fmt: skip


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_output_is_the_dequantized_formula(fmt, case, dtype, reference_ops):
    depth, channels, group_size = CASES[case]
    layer, method, (q, scales, zeros) = build(fmt, depth, channels, group_size, dtype)
    x = torch.randn(2, 3, depth, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = forward(method, layer, x)
    assert out.shape == (2, 3, channels) and out.dtype == dtype
    expected = plain_wna16(x, q, scales, zeros)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("fmt", FORMATS)
def test_weights_stay_packed_in_the_plugin_layout(fmt, reference_ops):
    layer, method, (q, _, _) = build(fmt, 64, 32, 32, torch.bfloat16)
    kernel = method.kernel
    weight = getattr(layer, kernel.w_q_name)
    assert weight.dtype == torch.int32 and weight.shape == (64, 4)  # [K, N / 8]: 4 bits a value
    assert getattr(layer, kernel.w_s_name).shape == (2, 32)
    assert layer.kunlun_w4_zeros.shape == (2, 4) and layer.kunlun_w4_zeros.dtype == torch.int32
    from vllm_kunlun.ops.quant.int4_layout import unpack_int4

    assert torch.equal(unpack_int4(weight).long(), q)


def test_a_forward_runs_the_plugin_op_and_is_routed_as_one(reference_ops):
    layer, method, _ = build("gptq", 64, 32, 32, torch.float32)
    layer.quant_method = method
    before = stats.snapshot()
    method.apply(layer, torch.randn(4, 64))
    assert stats.snapshot().get("wna16_gemm", 0) - before.get("wna16_gemm", 0) == 1
    assert plugin_linear_kernel(layer) is method.kernel
    assert method.kernel.ops_used == ("wna16_gemm",)


def test_can_implement_names_what_it_cannot_do(monkeypatch):
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import (
        MPLinearLayerConfig,
    )
    from vllm.scalar_type import scalar_types

    from vllm_kunlun.platform import base

    def config(**changes):
        fields = dict(full_weight_shape=(64, 32), partition_weight_shape=(64, 32),
                      weight_type=scalar_types.uint4b8, act_type=torch.bfloat16, group_size=32,
                      zero_points=False) | changes  # fmt: skip
        return MPLinearLayerConfig(**fields)

    assert KunlunWNA16LinearKernel.can_implement(config()) == (False, "needs a Kunlun platform "
                                                                      "(vllm-kunlun)")  # fmt: skip
    monkeypatch.setattr("vllm.platforms._current_platform", object.__new__(
        base.KunlunPlatformBase))  # fmt: skip
    assert KunlunWNA16LinearKernel.can_implement(config()) == (True, None)
    with_zeros = config(zero_points=True, weight_type=scalar_types.uint4)
    assert KunlunWNA16LinearKernel.can_implement(with_zeros) == (True, None)
    eight_bit = config(weight_type=scalar_types.uint8b128, partition_weight_shape=(64, 20))
    assert KunlunWNA16LinearKernel.can_implement(eight_bit) == (True, None)  # bytes: no packing
    for changes, says in [
        (dict(weight_type=scalar_types.uint2b2), "4-bit and 8-bit weights only"),
        (dict(partition_weight_shape=(64, 20)), "20 output channels per partition"),
        (dict(partition_weight_shape=(48, 32)), "(48) is not a multiple of the group size (32)"),
    ]:
        ok, reason = KunlunWNA16LinearKernel.can_implement(config(**changes))
        assert not ok and says in reason


# GPTQ act-order (desc_act) ----------------------------------------------------------------------


def build_act_order(depth: int, channels: int, group_size: int, dtype: torch.dtype, seed=0):
    """A GPTQ act-order layer: channel k in group g_idx[k], the groups given to the channels in
    a random order (as GPTQ does, by decreasing Hessian diagonal), each group group_size of
    them. Returns the layer, the method, and (q, scales, g_idx) as loaded."""
    g = torch.Generator().manual_seed(seed)
    groups = depth // group_size
    q, scales, _ = random_weights(depth, channels, groups, True, seed)
    g_idx = torch.empty(depth, dtype=torch.int32)
    g_idx[torch.randperm(depth, generator=g)] = torch.arange(depth, dtype=torch.int32) // group_size
    layer = nn.Module()
    config = KunlunGPTQConfig(4, group_size, True, True, False, {}, {})
    method = KunlunGPTQLinearMethod(config)
    method.create_weights(layer, input_size_per_partition=depth, output_partition_sizes=[channels],
                          input_size=depth, output_size=channels, params_dtype=dtype,
                          weight_loader=None)  # fmt: skip
    layer.qweight.data = pack_words(q.t()).t().contiguous()
    layer.qzeros.data = pack_words(torch.full((groups, channels), 7))
    layer.scales.data = scales.to(dtype)
    layer.g_idx.load_row_parallel_weight(g_idx)
    layer.bias = None
    return layer, method, (q, scales.to(dtype), g_idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gptq_act_order_output_is_the_formula_with_g_idx(dtype, reference_ops):
    """vLLM 0.32 refuses desc_act; the plugin's GPTQ config keeps it, its method loads g_idx, and
    the kernel sorts the rows by group and takes the sort as wna16_gemm's input order."""
    layer, method, (q, scales, g_idx) = build_act_order(96, 40, 32, dtype)
    assert method.quant_config.desc_act
    method.process_weights_after_loading(layer)
    assert not hasattr(layer, "g_idx") and layer.kunlun_w4_input_order.dtype == torch.int64
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1)).to(dtype)
    before = stats.snapshot()
    out = method.apply(layer, x)
    assert stats.snapshot().get("wna16_gemm", 0) == before.get("wna16_gemm", 0) + 1
    weight = (q.double() - 8) * scales.double()[g_idx.long()]  # row k scaled by its group's scale
    expected = x.double() @ weight
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)
    # The same weights read as contiguous groups would be another matrix: g_idx matters here.
    contiguous = (q.double() - 8) * scales.double().repeat_interleave(32, dim=0)
    assert (x.double() @ contiguous - expected).abs().max() > 10 * tolerance


def test_gptq_act_order_refuses_a_g_idx_that_is_not_gptqs(reference_ops):
    layer, method, _ = build_act_order(64, 16, 32, torch.float32)
    layer.g_idx.data = torch.zeros(64, dtype=torch.int32)  # every channel in group 0
    with pytest.raises(ValueError, match="g_idx does not give each of the 2 groups exactly 32"):
        method.process_weights_after_loading(layer)
    unloaded, method, _ = build_act_order(64, 16, 32, torch.float32)
    unloaded.g_idx.data.fill_(-1)  # what create_weights leaves when no g_idx was loaded
    with pytest.raises(ValueError, match="g_idx does not give each"):
        method.process_weights_after_loading(unloaded)


def test_gptq_act_order_fused_parts_must_share_their_g_idx():
    """q/k/v (or gate/up) share one g_idx: the parts' checkpoints must agree."""
    layer, _, (_, _, g_idx) = build_act_order(64, 16, 32, torch.float32)
    for shard in ("q", "k"):
        layer.g_idx.load_qkv_weight(g_idx, shard_id=shard)
    assert torch.equal(layer.g_idx.data, g_idx)
    with pytest.raises(ValueError, match="different g_idx"):
        layer.g_idx.load_qkv_weight(g_idx.flip(0), shard_id="v")


def test_gptq_act_order_refuses_a_split_input_dimension():
    config = KunlunGPTQConfig(4, 32, True, True, False, {}, {})
    with pytest.raises(ValueError, match="act-order needs --tensor-parallel-size 1"):
        KunlunGPTQLinearMethod(config).create_weights(
            nn.Module(), input_size_per_partition=32, output_partition_sizes=[16], input_size=64,
            output_size=16, params_dtype=torch.float32, weight_loader=None,
        )  # fmt: skip


# 8-bit weights (GPTQ 8-bit, compressed-tensors W8A16) ------------------------------------------


def build_8bit(fmt: str, depth: int, channels: int, group_size: int, dtype: torch.dtype):
    """A GPTQ 8-bit (symmetric, stored q + 128) or compressed-tensors W8A16 layer (symmetric, or
    with zero points for "w8a16-asym"), four values to an int32 word as the formats pack them,
    and the (q [K, N], scales [G, N], zeros [G, N]) it holds."""
    g = torch.Generator().manual_seed(3)
    groups = depth // group_size if group_size != -1 else 1
    q = torch.randint(0, 256, (depth, channels), generator=g)
    q[0, :4] = torch.tensor([0, 255, 128, 127])
    scales = torch.rand(groups, channels, generator=g) * 0.002 + 0.0001
    asymmetric = fmt == "w8a16-asym"
    zeros = (torch.randint(0, 256, (groups, channels), generator=g) if asymmetric
             else torch.full((groups, channels), 128))  # fmt: skip

    def pack_bytes(values: torch.Tensor) -> torch.Tensor:  # [..., 4m] -> int32 [..., m]
        words = values.long().unflatten(-1, (-1, 4))
        packed = sum(words[..., i] << (8 * i) for i in range(4))
        return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)

    layer = nn.Module()
    sizes = dict(input_size_per_partition=depth, output_partition_sizes=[channels],
                 input_size=depth, output_size=channels, params_dtype=dtype)  # fmt: skip
    if fmt == "gptq-8bit":
        method = KunlunGPTQLinearMethod(KunlunGPTQConfig(8, group_size, False, True, False, {}, {}))
        method.create_weights(layer, **sizes, weight_loader=None)
        layer.qweight.data = pack_bytes(q.t()).t().contiguous()  # [K/4, N]
        layer.qzeros.data = pack_bytes(zeros - 1)  # v1 stores zero - 1 (ignored: symmetric)
        layer.scales.data = scales.to(dtype)
    else:
        strategy = "group" if group_size != -1 else "channel"
        method = CompressedTensorsWNA16(strategy, 8, group_size if group_size != -1 else None,
                                        symmetric=not asymmetric, layer_name="layer")  # fmt: skip
        method.create_weights(layer, weight_loader=None, **sizes)
        layer.weight_packed.data = pack_bytes(q.t())  # [N, K/4]
        layer.weight_scale.data = scales.t().contiguous().to(dtype)  # [N, G]
        if asymmetric:
            layer.weight_zero_point.data = pack_bytes(zeros).t().contiguous()  # [N/4, G]
    layer.bias = None
    method.process_weights_after_loading(layer)
    return layer, method, (q, scales.to(dtype), zeros)


@pytest.mark.parametrize("fmt", ["gptq-8bit", "w8a16", "w8a16-asym"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_8bit_output_is_the_dequantized_formula(fmt, case, dtype, reference_ops):
    depth, channels, group_size = CASES[case]
    layer, method, (q, scales, zeros) = build_8bit(fmt, depth, channels, group_size, dtype)
    kernel = method.kernel
    weight, held_zeros = getattr(layer, kernel.w_q_name), layer.kunlun_w4_zeros
    assert weight.dtype == held_zeros.dtype == torch.uint8  # one byte a value, [K, N]
    assert torch.equal(weight.long(), q) and torch.equal(held_zeros.long(), zeros)
    x = torch.randn(2, 3, depth, generator=torch.Generator().manual_seed(1)).to(dtype)
    before = stats.snapshot()
    out = forward(method, layer, x)
    assert stats.snapshot().get("w8a16_gemm", 0) == before.get("w8a16_gemm", 0) + 1
    assert kernel.ops_used == ("w8a16_gemm",)
    assert out.shape == (2, 3, channels) and out.dtype == dtype
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    torch.testing.assert_close(out.double(), plain_wna16(x, q, scales, zeros), rtol=tolerance,
                               atol=tolerance)  # fmt: skip
