"""Activation-aware scaling and clipping for 4-bit checkpoints (model_zoo.activation_aware),
checked against plain formulas; no engine starts here. That it pays off on a real model is
tests/test_quantized_accuracy.py's perplexity bound."""

import json

import pytest
import torch

from vllm_kunlun.model_zoo import activation_aware as aa
from vllm_kunlun.model_zoo.quantized import MARKER, make_quantized_checkpoint

GROUP = 32


def output_error(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    """Squared error of the Linear's outputs on inputs x: sum ||x (approx - weight)^T||^2."""
    return float((x @ (approx - weight).T).pow(2).sum())


def activations_with_outlier_channels(tokens: int, channels: int) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(tokens, channels)
    x[:, ::17] *= 30  # a few channels carry most of the magnitude, as in real models
    return x


@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_is_min_max_round_to_nearest(symmetric):
    torch.manual_seed(1)
    weight = torch.randn(24, 4 * GROUP)
    weight[3, :GROUP] = 0.0  # a group of zeros
    approx = aa.fake_quantize(weight, GROUP, symmetric)
    groups, approx_groups = weight.reshape(24, 4, GROUP), approx.reshape(24, 4, GROUP)
    if symmetric:
        step = 2 * groups.abs().amax(-1, keepdim=True) / 15
    else:
        step = (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 15
    assert torch.all((approx_groups - groups).abs() <= step / 2 + 1e-6)
    levels = [len(torch.unique(g)) for g in approx_groups.reshape(-1, GROUP)]
    assert max(levels) <= 16  # 4 bits
    assert torch.equal(approx[3, :GROUP], torch.zeros(GROUP))


@pytest.mark.parametrize("symmetric", [True, False])
def test_scale_search_beats_round_to_nearest_on_outlier_channels(symmetric):
    x = activations_with_outlier_channels(256, 4 * GROUP)
    weights = [torch.randn(48, 4 * GROUP), torch.randn(16, 4 * GROUP)]
    alpha, scale = aa.search_scale(x, weights, GROUP, symmetric)

    def error(s: torch.Tensor) -> float:
        return sum(output_error(x, w, aa.fake_quantize(w * s, GROUP, symmetric) / s)
                   for w in weights)  # fmt: skip

    assert 0 < alpha < 1
    magnitude = x.abs().mean(0).pow(alpha)
    assert torch.allclose(scale, magnitude / (magnitude.max() * magnitude.min()).sqrt())
    assert error(scale) < 0.9 * error(torch.ones(4 * GROUP))  # alpha = 0: plain rounding


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_lowers_each_groups_output_error(symmetric):
    x = activations_with_outlier_channels(128, 3 * GROUP)
    torch.manual_seed(2)
    weight = torch.randn(40, 3 * GROUP)
    weight[torch.rand_like(weight) < 0.02] *= 8  # heavy tails: worth clipping
    clipped = aa.search_clip(x, weight, GROUP, symmetric)

    groups, clipped_groups = weight.reshape(40, 3, GROUP), clipped.reshape(40, 3, GROUP)
    if symmetric:
        assert torch.all(clipped_groups.abs() <= groups.abs().amax(-1, keepdim=True))
    else:
        assert torch.all(clipped_groups >= groups.amin(-1, keepdim=True))
        assert torch.all(clipped_groups <= groups.amax(-1, keepdim=True))
    assert not torch.equal(clipped, weight)
    x_search = x[:: aa.SEARCH_TOKEN_STRIDE]
    for j in range(3):
        cols = slice(j * GROUP, (j + 1) * GROUP)
        for n in range(40):
            plain = aa.fake_quantize(weight, GROUP, symmetric)[n, cols]
            ours = aa.fake_quantize(clipped, GROUP, symmetric)[n, cols]
            error_plain = float((x_search[:, cols] @ (plain - weight[n, cols])).pow(2).sum())
            error_ours = float((x_search[:, cols] @ (ours - weight[n, cols])).pow(2).sum())
            assert error_ours <= error_plain * (1 + 1e-5) + 1e-6


def float_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


CHUNKS = [list(range(5, 45)), list(range(100, 130))]


def test_folding_the_scales_keeps_the_float_models_outputs(tiny_model_factory, monkeypatch):
    """Whatever scale is chosen, W diag(s) after a norm (or rows) divided by s computes the
    same function: checked with random scales in place of the search's."""
    model = float_model(tiny_model_factory("llama"))
    tokens = torch.tensor([CHUNKS[0]])
    with torch.no_grad():
        before = model(tokens).logits
    generator = torch.Generator().manual_seed(3)

    def random_scale(x, weights, group_size, symmetric):
        return 0.5, torch.rand(x.shape[1], generator=generator) * 1.5 + 0.5

    monkeypatch.setattr(aa, "search_scale", random_scale)
    inputs = aa.record_inputs(model, CHUNKS)
    norm = model.model.layers[0].input_layernorm.weight.detach().clone()
    alphas, input_scales = aa.scale_layers(model, inputs, GROUP, symmetric=False)
    with torch.no_grad():
        after = model(tokens).logits
    assert len(alphas) == 3 * len(model.model.layers)  # q/k/v, gate/up, down per layer
    assert not torch.equal(norm, model.model.layers[0].input_layernorm.weight)
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)
    # The scaled inputs the clip search is given are what the scaled model's Linears see.
    seen = aa.record_inputs(model, CHUNKS)
    name = "model.layers.1.mlp.down_proj"
    assert torch.allclose(seen[name], inputs[name] / input_scales[name], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch, named", [("gemma2", "x \\* \\(1 \\+ w\\)"),
                                         ("phi3", "has no q_proj, k_proj, v_proj")])  # fmt: skip
def test_layouts_it_cannot_scale_are_refused(tiny_model_factory, arch, named):
    with pytest.raises(ValueError, match=named):
        aa.apply(float_model(tiny_model_factory(arch)), CHUNKS, GROUP, symmetric=True)


def test_activation_aware_awq_checkpoint(tiny_model_factory, tmp_path):
    """The checkpoint carries the scaled norms and says how its weights were chosen; a
    non-4-bit scheme, or GPTQ as well, is refused."""
    from safetensors.torch import load_file

    source = tiny_model_factory("llama")
    folder = make_quantized_checkpoint(source, tmp_path / "awq", "awq", activation_aware=True)
    marker = json.loads((folder / MARKER).read_text())
    assert marker["weights"] == "activation-aware" and marker["scheme"] == "awq"
    written, original = load_file(folder / "model.safetensors"), float_model(source)
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.allclose(written[norm].float(), original.state_dict()[norm], atol=1e-3)
    with pytest.raises(ValueError, match="4-bit schemes only"):
        make_quantized_checkpoint(source, tmp_path / "x", "w8a8-dynamic", activation_aware=True)
    with pytest.raises(ValueError, match="not both"):
        make_quantized_checkpoint(source, tmp_path / "y", "awq", gptq=True, activation_aware=True)
