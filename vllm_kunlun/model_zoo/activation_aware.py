"""Activation-aware weight transforms for 4-bit round to nearest (the AWQ algorithm's two
searches, written from the paper's description), applied to the float model before a
format quantizes it.

1. Scaling. Input channels that carry large activations matter most, so their weights are
   scaled up before quantization (finer steps for them) and the inverse scale is folded into
   what feeds those channels. For the Linears reading one input x, with s = mean|x|^alpha
   (per input channel, normalised by sqrt(max s * min s)):

       W x = (W diag(s)) (diag(s)^-1 x)

   diag(s)^-1 goes into the RMSNorm weight before q/k/v_proj (and gate/up_proj), or into the
   rows of up_proj before down_proj (act(gate) * up is linear in up's outputs). alpha is
   searched on a grid in [0, 1) per group of Linears, minimising the squared error of their
   outputs on calibration inputs with the weights fake-quantized.
2. Clipping. Each group of `group_size` weights of an output channel is clamped to a fraction
   r of its range (its min and max for an asymmetric format, +-absmax for a symmetric one),
   r searched in [0.5, 1] per group, minimising the squared error of that group's share of
   the output. q_proj and k_proj are not clipped: their errors pass through the softmax.

The result is a float model that computes the same function (scaling) or nearly so
(clipping), whose weights the format then rounds to nearest as usual. Calibration inputs are
those of the float model on calibration.CALIBRATION_TEXT; every layer is searched on the
original model's activations (not re-collected after earlier layers were changed).

Supported: decoder layers with separate q/k/v_proj after `input_layernorm` and
gate/up/down_proj after `post_attention_layernorm`, whose norms multiply by their weight
(Llama, Qwen2, Qwen3, Mistral). A layer whose MLP is a mixture of experts keeps its MLP
unscaled (its norm also feeds the router). Other layouts are refused.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch

#: alpha = i / ALPHA_STEPS for i in range(ALPHA_STEPS).
ALPHA_STEPS = 20
#: Clip ratios 1, 1 - 1/CLIP_STEPS, ... down to MIN_CLIP.
CLIP_STEPS = 20
MIN_CLIP = 0.5
#: The searches measure output errors on every SEARCH_TOKEN_STRIDE-th calibration token (the
#: mean |x| that sets the scales uses all of them), to bound their cost.
SEARCH_TOKEN_STRIDE = 4
#: Norms that compute x * (1 + w) (Gemma) cannot take the inverse scale by division.
UNSUPPORTED_NORM_TYPES = ("gemma",)


def fake_quantize(weight: torch.Tensor, group_size: int, symmetric: bool) -> torch.Tensor:
    """Round-to-nearest 4-bit with min-max scales per group (float32 in and out); the search's
    model of the format's quantizer (symmetric: zero point 8)."""
    n, k = weight.shape
    groups = weight.reshape(n, k // group_size, group_size)
    if symmetric:
        scale = (2 * groups.abs().amax(-1, keepdim=True) / 15).clamp(min=1e-8)
        zero = torch.full_like(scale, 8.0)
    else:
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-5)
        zero = torch.clamp(-torch.round(low / scale), 0, 15)
    q = torch.clamp(torch.round(groups / scale) + zero, 0, 15)
    return ((q - zero) * scale).reshape(n, k)


def clip_groups(weight: torch.Tensor, group_size: int, ratio: torch.Tensor, symmetric: bool):
    """`weight` [N, K] with each group clamped to `ratio` [N, K/G, 1] of its range."""
    n, k = weight.shape
    groups = weight.reshape(n, k // group_size, group_size)
    if symmetric:
        high = groups.abs().amax(-1, keepdim=True) * ratio
        low = -high
    else:
        low = groups.amin(-1, keepdim=True) * ratio
        high = groups.amax(-1, keepdim=True) * ratio
    return torch.maximum(torch.minimum(groups, high), low).reshape(n, k)


@dataclass
class Searched:
    """What the searches chose: alpha per group of Linears sharing an input, and the mean
    absolute change clipping made to each clipped Linear's weights."""

    alphas: dict[str, float]
    clip_changes: dict[str, float]


def search_scale(x: torch.Tensor, weights: list[torch.Tensor], group_size: int,
                 symmetric: bool) -> tuple[float, torch.Tensor]:  # fmt: skip
    """The best alpha for Linears `weights` ([N_i, K], float32) reading inputs `x` [T, K],
    and its scale s [K]."""
    magnitude = x.abs().mean(dim=0)
    x = x[::SEARCH_TOKEN_STRIDE]
    best: tuple[float, float, torch.Tensor] | None = None
    for step in range(ALPHA_STEPS):
        alpha = step / ALPHA_STEPS
        scale = magnitude.pow(alpha).clamp(min=1e-4)
        scale = scale / (scale.max() * scale.min()).sqrt()
        error = 0.0
        for weight in weights:
            approx = fake_quantize(weight * scale, group_size, symmetric) / scale
            error += (x @ (approx - weight).T).pow(2).mean().item()
        if best is None or error < best[1]:
            best = (alpha, error, scale)
    assert best is not None
    return best[0], best[2]


def search_clip(x: torch.Tensor, weight: torch.Tensor, group_size: int,
                symmetric: bool) -> torch.Tensor:  # fmt: skip
    """`weight` [N, K] with each group clamped to the ratio that minimises the squared error of
    its share of the outputs on inputs `x` [T, K]."""
    n, k = weight.shape
    x_groups = x[::SEARCH_TOKEN_STRIDE].reshape(-1, k // group_size, group_size)
    w_groups = weight.reshape(n, k // group_size, group_size)
    best, best_error = weight, None
    for step in range(int(CLIP_STEPS * (1 - MIN_CLIP)) + 1):
        ratio = torch.full((n, k // group_size, 1), 1 - step / CLIP_STEPS)
        clipped = clip_groups(weight, group_size, ratio, symmetric)
        error_weights = w_groups - fake_quantize(clipped, group_size, symmetric).reshape(
            n, k // group_size, group_size
        )
        error = torch.einsum("tjg,njg->tnj", x_groups, error_weights).pow(2).sum(dim=0)
        if best_error is None:
            best, best_error = clipped, error
            continue
        better = (error < best_error).repeat_interleave(group_size, dim=1)
        best = torch.where(better, clipped, best)
        best_error = torch.minimum(error, best_error)
    return best


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    model_type = getattr(model.config, "model_type", "")
    if model_type.startswith(UNSUPPORTED_NORM_TYPES):
        raise ValueError(
            f"activation-aware scaling does not support {model_type} (its norms compute "
            "x * (1 + w)); quantize it with round to nearest"
        )
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError("activation-aware scaling needs decoder layers at model.model.layers")
    for index, layer in enumerate(layers):
        attention = getattr(layer, "self_attn", None)
        missing = [name for name in ("q_proj", "k_proj", "v_proj")
                   if not isinstance(getattr(attention, name, None), torch.nn.Linear)]  # fmt: skip
        missing += [n for n in ("input_layernorm", "post_attention_layernorm")
                    if getattr(getattr(layer, n, None), "weight", None) is None]  # fmt: skip
        if missing:
            raise ValueError(
                f"activation-aware scaling supports Llama-style decoder layers; layer {index} "
                f"has no {', '.join(missing)}: quantize it with round to nearest"
            )
    return list(layers)


def _dense_mlp(layer: torch.nn.Module) -> torch.nn.Module | None:
    mlp = getattr(layer, "mlp", None)
    names = ("gate_proj", "up_proj", "down_proj")
    if all(isinstance(getattr(mlp, n, None), torch.nn.Linear) for n in names):
        return mlp
    return None


def record_inputs(model: torch.nn.Module, chunks: Iterable[list[int]]) -> dict[str, torch.Tensor]:
    """The inputs [tokens, K] (float32) of every decoder-layer Linear over the token chunks."""
    recorded: dict[str, list[torch.Tensor]] = {}

    def recorder(name: str):
        def hook(_module, args):
            x = args[0].detach()
            recorded.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).float())

        return hook

    linears = {name: m for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")}  # fmt: skip
    handles = [m.register_forward_pre_hook(recorder(name)) for name, m in linears.items()]
    try:
        with torch.no_grad():
            for chunk in chunks:
                # The decoder only: the LM head's logits are not needed (and cost most on a
                # tiny model with a large vocabulary).
                model.model(torch.tensor([chunk]), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    unreached = sorted(linears.keys() - recorded.keys())
    if unreached:
        raise RuntimeError(f"no calibration input reached {', '.join(unreached)}")
    return {name: torch.cat(parts) for name, parts in recorded.items()}


def scale_layers(model: torch.nn.Module, inputs: dict[str, torch.Tensor], group_size: int,
                 symmetric: bool) -> tuple[dict[str, float], dict[str, torch.Tensor]]:  # fmt: skip
    """Search and fold every layer's scales in place (the model computes the same function).
    Returns alpha per group of Linears and, per scaled Linear, the scale s its inputs are
    now divided by."""
    alphas: dict[str, float] = {}
    input_scales: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for index, layer in enumerate(_layers(model)):
            p = f"model.layers.{index}."
            attention = layer.self_attn
            groups = [("self_attn", ["q_proj", "k_proj", "v_proj"], attention,
                       layer.input_layernorm.weight, None)]  # fmt: skip
            mlp = _dense_mlp(layer)
            if mlp is not None:
                groups += [("mlp", ["gate_proj", "up_proj"], mlp,
                            layer.post_attention_layernorm.weight, None),
                           ("mlp", ["down_proj"], mlp, None, mlp.up_proj.weight)]  # fmt: skip
            for block, names, parent, norm_weight, feeding_rows in groups:
                full = [f"{p}{block}.{name}" for name in names]
                linears = [getattr(parent, name) for name in names]
                alpha, scale = search_scale(inputs[full[0]], [m.weight.float() for m in linears],
                                            group_size, symmetric)  # fmt: skip
                for name, module in zip(full, linears, strict=True):
                    module.weight.copy_((module.weight.float() * scale).to(module.weight.dtype))
                    input_scales[name] = scale
                if norm_weight is not None:
                    norm_weight.copy_((norm_weight.float() / scale).to(norm_weight.dtype))
                if feeding_rows is not None:
                    rows = feeding_rows.float() / scale[:, None]
                    feeding_rows.copy_(rows.to(feeding_rows.dtype))
                alphas[full[0].rsplit(".", 1)[0] + "." + "+".join(names)] = alpha
    return alphas, input_scales


def clip_linears(model: torch.nn.Module, inputs: dict[str, torch.Tensor], group_size: int,
                 symmetric: bool) -> dict[str, float]:  # fmt: skip
    """Clip every recorded Linear but q_proj and k_proj in place; `inputs` are those the model
    now sees. Returns the mean absolute change of each clipped Linear's weights."""
    changes = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if name not in inputs or name.endswith(("q_proj", "k_proj")):
                continue
            weight = module.weight.float()
            clipped = search_clip(inputs[name], weight, group_size, symmetric)
            changes[name] = float((clipped - weight).abs().mean())
            module.weight.copy_(clipped.to(module.weight.dtype))
    return changes


def apply(model: torch.nn.Module, chunks: Iterable[list[int]], group_size: int,
          symmetric: bool) -> Searched:  # fmt: skip
    """Scale, then clip, `model`'s decoder-layer Linears in place for 4-bit groups of
    `group_size` (symmetric or asymmetric min-max), calibrated on the token `chunks`."""
    _layers(model)  # refuse an unsupported layout before the calibration pass
    inputs = record_inputs(model, chunks)
    alphas, input_scales = scale_layers(model, inputs, group_size, symmetric)
    # The scaled model's inputs: the recorded ones divided by what was folded into them.
    scaled_inputs = {name: x / input_scales[name] if name in input_scales else x
                     for name, x in inputs.items()}  # fmt: skip
    return Searched(alphas, clip_linears(model, scaled_inputs, group_size, symmetric))
