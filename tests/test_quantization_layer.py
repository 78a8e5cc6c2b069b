"""The plugin's W8A8 int8 linear kernel (vllm_kunlun.quantization.int8_linear) on layers laid out
as vLLM's compressed-tensors scheme lays them out, without an engine: its output against the
plain formula written here (quantize the activations, multiply the integers, scale), the scales
it keeps in Kunlun's absmax convention, its registration in vLLM's kernel list and its route.
The engine tests are in tests/test_quantized_models.py."""

import pytest
import torch
from torch import nn
from vllm.model_executor.kernels.linear.scaled_mm.ScaledMMLinearKernel import (
    Int8ScaledMMLinearLayerConfig,
)

from vllm_kunlun.ops import stats
from vllm_kunlun.quantization.int8_linear import KunlunInt8ScaledMMLinearKernel, per_channel

PARAM_NAMES = ["weight", "weight_scale", "input_scale", "input_zero_point", "azp_adj"]


@pytest.fixture(autouse=True)
def on_a_kunlun_platform(monkeypatch):
    """The kernel only accepts a Kunlun platform; this process runs vLLM's CPU platform."""
    monkeypatch.setattr(KunlunInt8ScaledMMLinearKernel, "is_supported",
                        classmethod(lambda cls, compute_capability=None: (True, None)))  # fmt: skip


def layer_config(static: bool, symmetric: bool, channelwise: bool = True):
    return Int8ScaledMMLinearLayerConfig(is_channelwise=channelwise, is_static_input_scheme=static,
                                         input_symmetric=symmetric)  # fmt: skip


def make_layer(widths, k, *, channelwise=True, static=False, symmetric=True, bias=False, seed=0):
    """A layer with the parameters CompressedTensorsW8A8Int8.create_weights registers, loaded
    with random int8 weights and scales, and the plugin kernel for it."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Module()
    layer.logical_widths = list(widths)
    n = sum(widths)
    weight = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    scales = torch.rand(n if channelwise else len(widths), generator=g) * 0.01 + 0.001
    layer.weight_scale = nn.Parameter(scales.reshape(n, 1) if channelwise else scales,
                                      requires_grad=False)  # fmt: skip
    layer.input_scale = nn.Parameter(torch.tensor([0.02]), requires_grad=False) if static else None
    zero_point = torch.tensor([-7], dtype=torch.int8) if static and not symmetric else None
    layer.input_zero_point = None if zero_point is None else nn.Parameter(zero_point, False)
    layer.azp_adj = None
    layer.bias = nn.Parameter(torch.randn(n, generator=g), False) if bias else None
    config = layer_config(static, symmetric, channelwise)
    kernel = KunlunInt8ScaledMMLinearKernel(config, PARAM_NAMES)
    expected_scales = per_row(layer.weight_scale.detach().reshape(-1), widths)
    plain = {"weight": weight.clone(), "row_scale": expected_scales,
             "input_scale": 0.02 if static else None,
             "zero_point": -7 if zero_point is not None else 0}  # fmt: skip
    kernel.process_weights_after_loading(layer)
    return layer, kernel, plain


def per_row(scales: torch.Tensor, widths) -> torch.Tensor:
    if scales.numel() == sum(widths):
        return scales.double()
    return torch.cat([s.repeat(w) for s, w in zip(scales.double(), widths, strict=True)])


def plain_w8a8(x: torch.Tensor, plain: dict, bias: torch.Tensor | None) -> torch.Tensor:
    """Quantize x as the scheme says (in float32, as the quant ops' contract computes the
    quotient, so near-ties round alike), then multiply the integers and scale in float64."""
    rows = x.reshape(-1, x.shape[-1]).float()
    if plain["input_scale"] is None:
        scale = rows.abs().amax(dim=-1, keepdim=True) / 127
        q = torch.where(scale > 0, rows / scale, torch.zeros_like(rows)).round().clamp(-127, 127)
        zero_point = 0
    else:
        scale = torch.tensor([plain["input_scale"]], dtype=torch.float32)
        zero_point = plain["zero_point"]
        q = ((rows / scale).round() + zero_point).clamp(-128, 127)
    out = ((q.double() - zero_point) @ plain["weight"].double().T) * scale.double()
    out = out * plain["row_scale"]
    if bias is not None:
        out = out + bias.double()
    return out.reshape(*x.shape[:-1], -1)


CASES = {
    "dynamic, per channel": dict(widths=[48], k=64),
    "dynamic, fused qkv, per-tensor scales": dict(widths=[32, 16, 16], k=96, channelwise=False),
    "static": dict(widths=[40], k=64, static=True),
    "static asymmetric, bias": dict(widths=[24, 24], k=32, static=True, symmetric=False,
                                    bias=True),
    "N odd, K odd": dict(widths=[7], k=33, bias=True),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_output_is_the_w8a8_formula(case, dtype, reference_ops):
    layer, kernel, plain = make_layer(**CASES[case])
    torch.manual_seed(0)
    x = (torch.randn(2, 3, layer.weight.shape[1]) * 1.5).to(dtype)
    x[0, 1] = 0  # a row of zeros: its absmax is 0
    out = kernel.apply_weights(layer, x, layer.bias)
    assert out.shape == (2, 3, layer.weight.shape[0]) and out.dtype == dtype
    expected = plain_w8a8(x.float(), plain, layer.bias)
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance * 4)


def test_scales_are_kept_as_kunlun_absmax(reference_ops):
    layer, _, plain = make_layer(widths=[32, 16, 16], k=64, channelwise=False, static=True)
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.shape == (64,)
    torch.testing.assert_close(layer.weight_scale.double(), plain["row_scale"] * 127)
    torch.testing.assert_close(layer.kunlun_input_absmax, torch.tensor([[0.02 * 127]]))
    assert layer.weight.dtype == torch.int8  # no float copy of the weights is kept


def test_a_dynamic_layer_runs_the_plugin_ops(reference_ops):
    layer, kernel, _ = make_layer(widths=[16], k=32)
    before = stats.snapshot()
    kernel.apply_weights(layer, torch.randn(4, 32))
    after = stats.snapshot()
    ran = {op for op in after if after[op] - before.get(op, 0)}
    assert ran == {"int8_quant_per_token", "int8_scaled_mm"}
    assert kernel.ops_used == ("int8_quant_per_token", "int8_scaled_mm")


def test_float_weights_under_an_int8_config_are_refused():
    layer = nn.Module()
    layer.logical_widths = [8]
    layer.weight = nn.Parameter(torch.randn(8, 16), requires_grad=False)
    layer.weight_scale = nn.Parameter(torch.ones(8, 1), requires_grad=False)
    config = layer_config(static=False, symmetric=True)
    kernel = KunlunInt8ScaledMMLinearKernel(config, PARAM_NAMES)
    with pytest.raises(ValueError, match="expected torch.int8"):
        kernel.process_weights_after_loading(layer)


def test_scales_that_fit_no_layout_are_refused():
    with pytest.raises(ValueError, match="5 values for 12 output rows"):
        per_channel(torch.ones(5), [4, 4, 4])


def test_dynamic_asymmetric_activations_cannot_be_implemented():
    config = layer_config(static=False, symmetric=False)
    ok, why = KunlunInt8ScaledMMLinearKernel.can_implement(config)
    assert not ok and "dynamic asymmetric" in why
    assert KunlunInt8ScaledMMLinearKernel.can_implement(layer_config(static=True, symmetric=False))[
        0
    ]


def test_not_supported_off_a_kunlun_platform(monkeypatch):
    monkeypatch.undo()  # the real is_supported; this process's platform is vLLM's CPU one
    ok, why = KunlunInt8ScaledMMLinearKernel.is_supported()
    assert not ok and "Kunlun platform" in why


def test_registration_puts_the_kernel_in_vllms_oot_int8_list_once():
    from vllm.model_executor import custom_op
    from vllm.model_executor.kernels import linear
    from vllm.platforms import PlatformEnum

    import vllm_kunlun.quantization as quantization
    from vllm_kunlun.quantization.routed_experts import KunlunRoutedExperts

    saved = {k: list(v) for k, v in linear._POSSIBLE_INT8_KERNELS.items()}
    saved_layers = dict(custom_op.op_registry_oot)
    try:
        quantization._registered = False
        quantization.register_quantization()
        quantization.register_quantization()
        oot = linear._POSSIBLE_INT8_KERNELS[PlatformEnum.OOT]
        assert oot.count(KunlunInt8ScaledMMLinearKernel) == 1
        assert custom_op.op_registry_oot["RoutedExperts"] is KunlunRoutedExperts
    finally:  # later tests build vLLM's own layers
        linear._POSSIBLE_INT8_KERNELS.clear()
        linear._POSSIBLE_INT8_KERNELS.update(saved)
        custom_op.op_registry_oot.clear()
        custom_op.op_registry_oot.update(saved_layers)
        quantization._registered = False


def test_a_quantized_linear_with_the_plugin_kernel_is_a_plugin_op_route():
    import types

    from vllm.model_executor.layers.linear import ReplicatedLinear

    from vllm_kunlun import routes

    layer, kernel, _ = make_layer(widths=[16], k=32, static=True)
    linear = nn.Module.__new__(ReplicatedLinear)  # the classifier reads the type and method
    nn.Module.__init__(linear)
    linear.quant_method = types.new_class("CompressedTensorsLinearMethod")()
    linear.scheme = types.new_class("CompressedTensorsW8A8Int8")()
    linear.scheme.kernel = kernel
    route = routes.classify(linear)
    assert route.route == routes.PLUGIN_OP
    assert route.detail == (
        "CompressedTensorsLinearMethod(CompressedTensorsW8A8Int8) -> "
        "KunlunInt8ScaledMMLinearKernel -> kunlun.int8_quant_static, kunlun.int8_scaled_mm"
    )
    linear.scheme.kernel = object()  # vLLM's own (CPU) kernel: refused
    assert routes.classify(linear).route == routes.REFUSED
