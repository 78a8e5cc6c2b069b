"""Quantized checkpoints made offline from an unquantized Hugging Face folder.

    make_quantized_checkpoint(source, target, scheme)   write one quantized folder
    quantized_checkpoint(source, scheme, cache_root)    the same, made once and reused
    vllm-kunlun quantize SOURCE TARGET --scheme S       the same from the command line

(each with opt-ins for the 4-bit schemes: GPTQ, gptq=True, --gptq; activation-aware scaling
and clipping, activation_aware=True, --activation-aware; see below).

The folders are written by compressed-tensors itself, the way LLM Compressor writes them:
the quantization config is attached to the transformers model (`apply_quantization_config`),
its scales are filled in, `ModelCompressor` compresses the weights, the model is saved with
`save_pretrained` and `ModelCompressor.update_config` writes config.json's
`quantization_config`. Scales and zero points come from compressed-tensors'
`calculate_qparams` (min-max; symmetric int8 scale = absmax / 127.5, values clamped to
[-128, 127]); int8 weights are rounded to nearest, with no calibration beyond the static
input scales, which come from running the float model on CALIBRATION_PROMPTS. The 4-bit
weights are rounded to nearest too unless GPTQ is asked for (gptq=True, --gptq: below).

Every nn.Linear but `lm_head` is quantized (the decoder layers' projections, fused ones
included); embeddings, norms and `lm_head` keep the source dtype. A recipe in _RECIPES says
what to write for a compressed-tensors scheme, with its own weight quantizer where
round-to-nearest is not the method.

Weight-only 4-bit schemes, with scales per group of `group_size` input channels. Their
Linear weights are rounded to nearest (RTN) by default: each group's scale (and zero point)
is the format's min-max formula over the group's float weights, rounded to the dtype the
format stores it in before the integers are computed, so every weight dequantizes to within
half a step of the float weight.

GPTQ is opt-in (gptq=True, `--gptq`): per-layer second-order error compensation
(vllm_kunlun.model_zoo.gptq) with the Hessian of each Linear's inputs, gathered in one pass
of the float model over calibration.CALIBRATION_TEXT (about 1,800 tokens in chunks of at
most 256): non-sequential GPTQ, every layer calibrated on the float model's inputs; the
scales are then the min-max formula over each group's error-updated weights, and the file
dequantizes exactly to GPTQ's result. It is not the default because that calibration text
is too short for wide layers: on the default model (layers with 1,536 inputs) GPTQ raised
perplexity above round to nearest (w4a16-asym: +30% over the float model against RTN's
+15.4%; gptq: +50%). A GPTQ copy records "weights": "gptq" in its marker file, and
quantized_checkpoint caches it in a folder of its own (suffix "-gptq").

Activation-aware scaling and clipping is the other opt-in (activation_aware=True,
`--activation-aware`): AWQ's searches (vllm_kunlun.model_zoo.activation_aware) change the
float model before it is rounded to nearest: per-channel scales folded into the norms and
up_proj rows (the float model computes the same function), then per-group clipping. They fit a
few numbers per layer, which the calibration text estimates well: on the default model `awq`
goes from +12.6% to +5.5% perplexity over bf16. Marker "weights": "activation-aware", folder
suffix "-activation-aware".

The schemes:

    w4a16, w4a16-asym   compressed-tensors `pack-quantized` (LLM Compressor's W4A16 and
                        W4A16_ASYM presets, as its GPTQModifier writes them): `weight_packed`
                        int32 [N, K/8], `weight_scale` [N, K/G] in the model dtype,
                        `weight_shape`, and for the asymmetric one `weight_zero_point` int32
                        [N/8, K/G]; written by compressed-tensors like the W8A8 schemes
                        (calculate_qparams per group, the compressor rounds to nearest; with
                        GPTQ each Linear's weight is replaced by GPTQ's dequantized weight and
                        its weight_scale / weight_zero_point by GPTQ's, which the compressor
                        rounds back to GPTQ's integers). vLLM 0.32 loads both with
                        CompressedTensorsWNA16. The routed experts of MoE models are always
                        rounded to nearest (below)
    w8a16               the same format with 8-bit weights (LLM Compressor's W8A16 preset with
                        groups): `weight_packed` int32 [N, K/4], four values a word; dense
                        models only (8-bit MoE experts have no plugin kernel)
    gptq                AutoGPTQ / GPTQModel's v1 format, symmetric, desc_act false
    gptq-act-order      the same with desc_act true: input channels grouped in decreasing
                        order of the Hessian diagonal (sum of x^2 on the calibration text), as
                        GPTQ's act-order does, recorded in `g_idx` (vLLM 0.32 refuses to load
                        it). The order needs the calibration pass even without GPTQ: the
                        Hessians are computed and only their diagonal is used, the weights
                        rounded to nearest group by group in that order
    awq                 AutoAWQ's GEMM format, asymmetric, with zero points and AutoAWQ's
                        min-max scales, rounded to nearest (or GPTQ's integers with GPTQ):
                        this is the AWQ format, not the AWQ algorithm (no activation-aware
                        scaling search)

The GPTQ and AWQ tensors and configs are written here (quantized_int4 describes their
layout). As the tools save float16 models, every tensor of those checkpoints that is not
quantized (embeddings, norms, lm_head, biases) is written in float16 and config.json's
`dtype` says float16, which vLLM's dtype "auto" follows where the platform supports it; an
explicit dtype casts them (bfloat16 or float16 only: vLLM's GPTQ and AWQ methods refuse
float32 activations). The compressed-tensors schemes keep the source dtype.
The group size is the largest of 128, 64 and 32 that divides every quantized input size
(SmolLM2-135M's hidden size 576 takes 64; the tiny test models mostly 128); it is printed,
written in the config and in the marker file, and a model that none divides is refused.

GPTQ and AWQ are written for dense models only: MoE models are refused. w4a16 handles MoE
models like w8a8-dynamic (below), the saved experts rounded to nearest (min-max) and packed
by compressed-tensors' pack-quantized compressor; with GPTQ, their shared experts and
attention Linears get GPTQ.

w8a8-smooth is w8a8-dynamic (the same config and tensors) written from a smoothed float
model, as LLM Compressor's SmoothQuantModifier smooths the up_proj -> down_proj mapping:
the inputs of an MLP's down projection (act(gate) * up) have a few huge outlier channels
that per-token int8 rounds badly, so each input channel j is scaled by
s_j = max|X_j|^alpha / max|W_down[:, j]|^(1 - alpha) (alpha = SMOOTH_ALPHA, X the inputs
seen on CALIBRATION_PROMPTS, s_j = 1 where either maximum is 0), folded exactly into the
float weights before quantization: up_proj's output row j is divided by s_j and down_proj's
column j multiplied by it. It applies to dense MLPs with separate gate_proj / up_proj /
down_proj (Llama, Qwen2/3, Mistral) or Phi-3's fused gate_up_proj (the up half's rows);
MoE models are refused (their routed experts are not smoothed), as is any model where no
such MLP is found.

MoE models (w8a8-dynamic and the weight-only w4a16 / w4a16-asym: vLLM's W8A8 int8 MoE method
takes dynamic per-token activations and refuses static input scales): transformers 5 keeps
the routed experts as fused 3-D parameters, not nn.Linear, so compressed-tensors leaves them
alone and `save_pretrained` writes them as per-expert 2-D tensors
(`...experts.E.gate_proj.weight`, or `w1`/`w2`/`w3` for Mixtral), the names vLLM's expert
loader maps. Those saved tensors are then quantized explicitly, each like a Linear
(compressed-tensors' `calculate_qparams` and the format's compressor:
`IntQuantizationCompressor`, int8 per output channel, `weight_scale` [N, 1]; or
`PackedQuantizationCompressor`, `weight_packed`, `weight_scale` [N, K/G], `weight_shape`),
next to the Linears compressed-tensors wrote. The one config group still targets `Linear`
(vLLM maps that target onto its fused experts layer). The routers (`mlp.gate`, Mixtral's
`block_sparse_moe.gate`) and shared-expert gates stay in the source dtype and are named in
`ignore` as LLM Compressor's MoE recipes do (`re:.*mlp.gate$`): vLLM's router layer
(GateLinear) would otherwise match the `Linear` target. Shared experts are ordinary Linears.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "vllm_kunlun_quantized.json"

#: Fixed calibration text for static activation scales.
CALIBRATION_PROMPTS = (
    "The capital of France is Paris, a city on the Seine.",
    "Once upon a time, a small fox lived at the edge of a forest.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Please write a short poem about the moon and the tides.",
    "The meeting has been moved to Thursday afternoon at three.",
    "def add(a, b):\n    return a + b",
    "In 1969, two astronauts walked on the surface of the moon.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
)

#: SmoothQuant's migration strength for w8a8-smooth.
SMOOTH_ALPHA = 0.5

_WEIGHT_INT8_CHANNEL = dict(num_bits=8, type="int", strategy="channel", symmetric=True,
                            dynamic=False)  # fmt: skip


def _say(message: str) -> None:
    print(f"[vllm-kunlun] {message}", file=sys.stderr, flush=True)


def _min_max_qparams(weight, args) -> tuple:
    """compressed-tensors' min-max scale and zero point of a 2-D weight [N, K] per the
    weight args: per tensor, per output channel ([N, 1]) or per group of input channels
    ([N, K / group_size])."""
    from compressed_tensors.quantization.utils import calculate_qparams

    if args.strategy == "tensor":
        low, high = weight.amin(), weight.amax()
    elif args.strategy == "channel":
        low, high = weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True)
    elif args.strategy == "group":
        grouped = weight.reshape(weight.shape[0], -1, args.group_size)
        low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
    else:
        raise NotImplementedError(f"min-max weight scales per {args.strategy} are not written")
    return calculate_qparams(low, high, args)


def _round_to_nearest(module, args) -> None:
    """Min-max weight scales (and zero points) per the weight args, as compressed-tensors
    computes them; the compressor then rounds the weight to nearest."""
    import torch

    with torch.no_grad():
        scale, zero_point = _min_max_qparams(module.weight.detach(), args)
        module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.copy_(zero_point.reshape(module.weight_zero_point.shape))


def _compressed_tensors_grid(args, scale_dtype):
    """GPTQ's group quantizer for compressed-tensors weight args: its integer range, and
    each group's scale and zero point from `calculate_qparams` (min-max, as
    _round_to_nearest), the scale rounded to the `scale_dtype` it is stored in."""
    import torch
    from compressed_tensors.quantization.utils import calculate_qparams, calculate_range

    from vllm_kunlun.model_zoo.gptq import Grid

    qmin, qmax = calculate_range(args, torch.device("cpu"))

    def qparams(group):
        scale, zero = calculate_qparams(group.amin(dim=-1), group.amax(dim=-1), args)
        return scale.to(scale_dtype).float(), zero.float()

    return Grid(int(qmin), int(qmax), qparams)


def _gptq_weights(module, args, hessian) -> None:
    """GPTQ of a Linear's weight with its input Hessian: the weight becomes GPTQ's
    dequantized weight (on the quantization grid) and weight_scale / weight_zero_point
    GPTQ's, so the compressor rounds it back to exactly GPTQ's integers (checked here)."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import quantize

    from vllm_kunlun.model_zoo.gptq import gptq_quantize

    dtype = module.weight.dtype
    grid = _compressed_tensors_grid(args, module.weight_scale.dtype)
    result = gptq_quantize(module.weight, hessian, args.group_size, grid)
    with torch.no_grad():
        module.weight.copy_(result.dequantize().to(dtype))
        module.weight_scale.copy_(result.scales.reshape(module.weight_scale.shape))
        zero_point = getattr(module, "weight_zero_point", None)
        if zero_point is not None:
            zero_point.copy_(result.zeros.reshape(zero_point.shape))
        q = quantize(module.weight, module.weight_scale, zero_point, args, dtype=torch.int8)
    if not torch.equal(q.float(), result.q):
        raise RuntimeError("GPTQ's weights do not round back to its integers")


def _calibration_chunks(source: Path, purpose: str) -> list[list[int]]:
    """The calibration text in the source model's tokens, announcing what it is used for."""
    from transformers import AutoTokenizer

    from vllm_kunlun.model_zoo.calibration import calibration_chunks

    chunks = calibration_chunks(AutoTokenizer.from_pretrained(source))
    tokens = sum(len(chunk) for chunk in chunks)
    _say(f"{purpose} on {tokens} calibration tokens ({len(chunks)} chunks) ...")
    return chunks


def _hessians(model, source: Path, names) -> dict:
    """GPTQ's input Hessians of the named Linears over the calibration text (one pass of
    the float model)."""
    from vllm_kunlun.model_zoo.gptq import collect_hessians

    chunks = _calibration_chunks(source, "collecting input Hessians")
    return collect_hessians(model, chunks, names)


@dataclass(frozen=True)
class _Recipe:
    description: str
    #: compressed-tensors CompressionFormat value written as `format`.
    format: str
    #: QuantizationArgs fields of the weights and of the input activations (None: not
    #: quantized).
    weights: dict
    input_activations: dict | None = None
    #: Fills a Linear's weight_scale (and weight_zero_point) from its float weight.
    weight_quantizer: Callable = field(default=_round_to_nearest)
    #: Smooth the MLPs' down_proj inputs into the float weights first (smooth_mlps).
    smooth: bool = False

    def scheme(self, targets: list[str], group_size: int | None = None):
        """The compressed-tensors scheme; `group_size` for a per-group weight strategy."""
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        weights = dict(self.weights)
        if self.grouped:
            weights["group_size"] = group_size
        inputs = self.input_activations
        return QuantizationScheme(
            targets=targets,
            weights=QuantizationArgs(**weights),
            input_activations=QuantizationArgs(**inputs) if inputs is not None else None,
        )

    @property
    def grouped(self) -> bool:
        return self.weights["strategy"] == "group"

    @property
    def static_inputs(self) -> bool:
        return self.input_activations is not None and not self.input_activations["dynamic"]


_RECIPES: dict[str, _Recipe] = {
    "w8a8-dynamic": _Recipe(
        "int8 weights per channel, int8 activations per token at run time (symmetric)",
        format="int-quantized",
        weights=_WEIGHT_INT8_CHANNEL,
        input_activations=dict(num_bits=8, type="int", strategy="token", symmetric=True,
                               dynamic=True),
    ),
    "w8a8-smooth": _Recipe(
        "w8a8-dynamic after SmoothQuant smoothing of the MLPs' down_proj inputs "
        f"(alpha {SMOOTH_ALPHA}; dense models)",
        format="int-quantized",
        weights=_WEIGHT_INT8_CHANNEL,
        input_activations=dict(num_bits=8, type="int", strategy="token", symmetric=True,
                               dynamic=True),
        smooth=True,
    ),
    "w8a8-static": _Recipe(
        "int8 weights per channel, int8 activations with a calibrated input_scale "
        "(symmetric)",
        format="int-quantized",
        weights=_WEIGHT_INT8_CHANNEL,
        input_activations=dict(num_bits=8, type="int", strategy="tensor", symmetric=True,
                               dynamic=False, observer="static_minmax"),
    ),
    "w8a8-static-asym": _Recipe(
        "int8 weights per channel, int8 activations with a calibrated input_scale and "
        "input_zero_point (asymmetric)",
        format="int-quantized",
        weights=_WEIGHT_INT8_CHANNEL,
        input_activations=dict(num_bits=8, type="int", strategy="tensor", symmetric=False,
                               dynamic=False, observer="static_minmax"),
    ),
    "w4a16": _Recipe(
        "int4 weights per group (symmetric), activations unquantized "
        "(compressed-tensors pack-quantized)",
        format="pack-quantized",
        weights=dict(num_bits=4, type="int", strategy="group", symmetric=True, dynamic=False),
    ),
    "w4a16-asym": _Recipe(
        "int4 weights per group with zero points (asymmetric), activations "
        "unquantized (compressed-tensors pack-quantized)",
        format="pack-quantized",
        weights=dict(num_bits=4, type="int", strategy="group", symmetric=False, dynamic=False),
    ),
    "w8a16": _Recipe(
        "int8 weights per group (symmetric), activations unquantized "
        "(compressed-tensors pack-quantized; dense models)",
        format="pack-quantized",
        weights=dict(num_bits=8, type="int", strategy="group", symmetric=True, dynamic=False),
    ),
}  # fmt: skip


@dataclass(frozen=True)
class _ToolFormat:
    """A 4-bit weight-only checkpoint in a quantization tool's own format (quantized_int4)."""

    description: str
    #: `quant_method` of the config, also the marker's format.
    format: str
    #: Quantize the input channels in activation order (GPTQ's desc_act).
    act_order: bool = False


_TOOL_FORMATS: dict[str, _ToolFormat] = {
    "gptq": _ToolFormat(
        "int4 weights per group (symmetric), GPTQ v1 format as AutoGPTQ / GPTQModel "
        "write it (desc_act false)",
        format="gptq",
    ),
    "gptq-act-order": _ToolFormat(
        "gptq with desc_act true: groups of input channels in decreasing Hessian-diagonal "
        "order (g_idx); vLLM 0.32 refuses to load it",
        format="gptq",
        act_order=True,
    ),
    "awq": _ToolFormat(
        "int4 weights per group with zero points (asymmetric), AutoAWQ GEMM format "
        "(AWQ's activation-aware searches with --activation-aware)",
        format="awq",
    ),
}

#: Scheme name -> description.
SCHEMES: dict[str, str] = {
    name: recipe.description for name, recipe in {**_RECIPES, **_TOOL_FORMATS}.items()
}

#: Module targets and ignored modules written in the config (LLM Compressor's usual recipe).
TARGETS = ["Linear"]
IGNORE = ["lm_head"]


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; supported: {', '.join(SCHEMES)}")


def _recipe(scheme: str) -> _Recipe:
    _check_scheme(scheme)
    return _RECIPES[scheme]


def _grouped(scheme: str) -> bool:
    """Whether the scheme's weights are quantized per group (a group size is chosen)."""
    return scheme in _TOOL_FORMATS or _RECIPES[scheme].grouped


def _four_bit(scheme: str) -> bool:
    """Whether the scheme's weights are 4-bit (GPTQ and the activation-aware search are
    written for them)."""
    return scheme in _TOOL_FORMATS or _RECIPES[scheme].weights["num_bits"] == 4


#: A routed expert's weight as transformers saves it (per expert, 2-D).
_EXPERT_WEIGHT = re.compile(r"\.experts\.\d+\.\w+\.weight$")


def _tensor_names(folder: Path) -> list[str]:
    from safetensors import safe_open

    names: list[str] = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            names.extend(f.keys())
    return names


def _moe_ignore(names: list[str]) -> list[str]:
    """Patterns for the routers and shared-expert gates of an MoE checkpoint (its tensor
    names as saved, which are vLLM's module names); empty for a dense one."""
    routers: list[str] = []
    shared_gates: list[str] = []
    for name in names:
        for leaf, found in (
            (".gate.weight", routers),
            (".shared_expert_gate.weight", shared_gates),
        ):
            if name.endswith(leaf):
                block = name[: -len(leaf)]
                if any(other.startswith(f"{block}.experts.") for other in names):
                    pattern = f"re:.*{block.rpartition('.')[2]}{leaf[: -len('.weight')]}$"
                    if pattern not in found:
                        found.append(pattern)
    return routers + shared_gates


def _check_source(source: Path) -> None:
    if not source.is_dir():
        raise FileNotFoundError(f"source checkpoint folder {source} does not exist")
    if not (source / "config.json").is_file() or not any(source.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{source} is not a Hugging Face checkpoint (config.json and *.safetensors)"
        )
    config = json.loads((source / "config.json").read_text())
    if "quantization_config" in config:
        raise ValueError(f"{source} is already quantized")


def _calibrate(model, tokenizer, names: set[str], per_channel: bool = False) -> dict[str, tuple]:
    """(min, max) of each named Linear's input over CALIBRATION_PROMPTS: scalars, or per
    input channel (the last dimension) with `per_channel`."""
    import torch

    observed: dict[str, tuple] = {}

    def observer(name):
        def hook(_module, args):
            x = args[0].detach().float()
            if per_channel:
                x = x.reshape(-1, x.shape[-1])
                low, high = x.amin(dim=0), x.amax(dim=0)
            else:
                low, high = x.min(), x.max()
            if name in observed:
                low = torch.minimum(low, observed[name][0])
                high = torch.maximum(high, observed[name][1])
            observed[name] = (low, high)

        return hook

    handles = [
        module.register_forward_pre_hook(observer(name))
        for name, module in model.named_modules()
        if name in names
    ]
    try:
        with torch.no_grad():
            for prompt in CALIBRATION_PROMPTS:
                ids = tokenizer(prompt, return_tensors="pt").input_ids
                model(ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return observed


def _mlp_up_down(model) -> dict[str, tuple]:
    """Per dense MLP (by module name): (up Linear, first up row, down Linear), where the
    down projection's input channel j is linear in the up Linear's output row first + j
    (act(gate) * up); Phi-3's fused gate_up_proj holds gate then up."""
    from torch import nn

    pairs = {}
    for name, module in model.named_modules():
        down = getattr(module, "down_proj", None)
        if not isinstance(down, nn.Linear):
            continue
        up, gate = getattr(module, "up_proj", None), getattr(module, "gate_proj", None)
        fused = getattr(module, "gate_up_proj", None)
        if isinstance(up, nn.Linear) and isinstance(gate, nn.Linear):
            first = 0
        elif isinstance(fused, nn.Linear) and fused.out_features == 2 * down.in_features:
            up, first = fused, down.in_features
        else:
            continue
        if up.out_features - first == down.in_features:
            pairs[name] = (up, first, down)
    return pairs


def smooth_mlps(model, tokenizer, alpha: float = SMOOTH_ALPHA) -> dict:
    """SmoothQuant the inputs of every dense MLP's down projection of `model` in place:
    s_j = max|X_j|^alpha / max|W_down[:, j]|^(1 - alpha) over CALIBRATION_PROMPTS (1 where
    either maximum is 0), up row j (and bias) divided by s_j, down column j multiplied by
    it, which leaves the float model's output unchanged. Returns {MLP name: s}; raises
    ValueError when the model has no such MLP."""
    import torch

    pairs = _mlp_up_down(model)
    if not pairs:
        raise ValueError(
            f"w8a8-smooth: found no MLP with up_proj (or gate_up_proj) and down_proj in "
            f"{type(model).__name__}; it smooths dense Llama-style or Phi-3 MLPs only"
        )
    downs = {f"{name}.down_proj": name for name in pairs}
    observed = _calibrate(model, tokenizer, set(downs), per_channel=True)
    factors = {}
    with torch.no_grad():
        for down_name, name in downs.items():
            if down_name not in observed:
                raise RuntimeError(f"no calibration input reached {down_name}")
            up, first, down = pairs[name]
            low, high = observed[down_name]
            x_max = torch.maximum(-low, high)
            w_max = down.weight.detach().float().abs().amax(dim=0)
            scale = x_max.pow(alpha) / w_max.pow(1 - alpha)
            scale = torch.where((x_max > 0) & (w_max > 0), scale, torch.ones_like(scale))
            rows = slice(first, first + down.in_features)
            up.weight[rows] = (up.weight[rows].float() / scale[:, None]).to(up.weight.dtype)
            if up.bias is not None:
                up.bias[rows] = (up.bias[rows].float() / scale).to(up.bias.dtype)
            down.weight.copy_((down.weight.float() * scale[None, :]).to(down.weight.dtype))
            factors[name] = scale
    return factors


def _fingerprint(source: Path) -> list:
    files = sorted([source / "config.json", *source.glob("*.safetensors")])
    return [[path.name, path.stat().st_size, path.stat().st_mtime_ns] for path in files]


def _marker(source: Path, scheme: str, group_size: int | None = None, gptq: bool = False,
            activation_aware: bool = False) -> dict:  # fmt: skip
    import compressed_tensors

    marker = {
        "source": str(source.resolve()),
        "scheme": scheme,
        "format": {**_RECIPES, **_TOOL_FORMATS}[scheme].format,
        "compressed_tensors": compressed_tensors.__version__,
        "source_files": _fingerprint(source),
    }
    if group_size is not None:
        marker["group_size"] = group_size
    if gptq or activation_aware:  # such a copy and a round-to-nearest one differ
        marker["weights"] = _weights_method(gptq, activation_aware)
    return marker


def _weights_method(gptq: bool, activation_aware: bool) -> str:
    """How the 4-bit integers are chosen: the marker's "weights" and the folder suffix."""
    return "gptq" if gptq else "activation-aware" if activation_aware else "round to nearest"


def _check_weights_method(scheme: str, gptq: bool, activation_aware: bool) -> None:
    if gptq and activation_aware:
        raise ValueError("choose one of GPTQ and activation-aware scaling, not both")
    if gptq and not _four_bit(scheme):
        raise ValueError(f"GPTQ is written for the 4-bit schemes only, not {scheme!r}")
    if activation_aware and not _four_bit(scheme):
        raise ValueError(
            f"activation-aware scaling is written for the 4-bit schemes only, not {scheme!r}"
        )


def _symmetric(scheme: str) -> bool:
    """Whether a 4-bit scheme's groups are symmetric (no zero points)."""
    if scheme in _TOOL_FORMATS:
        return _TOOL_FORMATS[scheme].format == "gptq"
    return bool(_RECIPES[scheme].weights.get("symmetric"))


def _activation_aware(model, source: Path, scheme: str, group_size: int) -> None:
    """Scale and clip the float model's Linears in place (model_zoo.activation_aware)."""
    from vllm_kunlun.model_zoo import activation_aware

    chunks = _calibration_chunks(source, "searching activation-aware scales and clips")
    started = time.monotonic()
    searched = activation_aware.apply(model, chunks, group_size, _symmetric(scheme))
    alphas = sorted(searched.alphas.values())
    _say(f"scaled {len(alphas)} groups of Linears (median alpha {alphas[len(alphas) // 2]:.2f}) "
         f"and clipped {len(searched.clip_changes)} Linears in "
         f"{time.monotonic() - started:.0f} s")  # fmt: skip


def _linears(model) -> dict:
    """The quantized Linears of a transformers model by name: every nn.Linear but lm_head."""
    from torch import nn

    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.split(".")[-1] not in IGNORE
    }


def _saved_expert_input_sizes(folder: Path) -> dict[str, int]:
    """Input size of each routed expert weight saved in `folder` (MoE), by tensor name."""
    from safetensors import safe_open

    sizes: dict[str, int] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():  # noqa: SIM118
                shape = f.get_slice(name).get_shape()
                if _EXPERT_WEIGHT.search(name) and len(shape) == 2:
                    sizes[name] = shape[1]
    return sizes


def _choose_group_size(scheme: str, input_sizes: dict[str, int]) -> int:
    from vllm_kunlun.model_zoo.quantized_int4 import choose_group_size

    try:
        group_size = choose_group_size(input_sizes)
    except ValueError as error:
        raise ValueError(f"{scheme}: {error}") from None
    _say(f"{scheme}: group size {group_size} (divides every quantized layer's input size)")
    return group_size


def _copy_extras(source: Path, target: Path) -> None:
    """Tokenizer files, chat template and the like: the source's files but the weights."""
    weights = {".safetensors", ".bin", ".pt", ".pth", ".gguf"}
    for path in sorted(source.iterdir()):
        wanted = path.is_file() and not path.name.startswith(".") and path.suffix not in weights
        if wanted and ".index." not in path.name and not (target / path.name).exists():
            shutil.copy(path, target / path.name)


def _write(source: Path, target: Path, scheme: str, gptq: bool = False,
           activation_aware: bool = False) -> int | None:  # fmt: skip
    """Write the compressed-tensors checkpoint; returns the group size (None: no groups)."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = _recipe(scheme)
    moe_ignore = _moe_ignore(_tensor_names(source))
    ignore = IGNORE + moe_ignore
    _say(f"loading {source} ...")
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto").eval()
    linears = set(_linears(model))
    group_size = None
    if recipe.grouped:
        input_sizes = {name: m.in_features for name, m in _linears(model).items()}
        group_size = _choose_group_size(scheme, input_sizes | _saved_expert_input_sizes(source))
    if recipe.smooth:
        factors = smooth_mlps(model, AutoTokenizer.from_pretrained(source))
        _say(f"smoothed the down_proj inputs of {len(factors)} MLPs (alpha {SMOOTH_ALPHA})")
    if activation_aware:
        _activation_aware(model, source, scheme, group_size)
    hessians = _hessians(model, source, linears) if gptq else {}
    observed = {}
    if recipe.static_inputs:
        _say(f"calibrating input scales on {len(CALIBRATION_PROMPTS)} prompts ...")
        observed = _calibrate(model, AutoTokenizer.from_pretrained(source), linears)

    config = QuantizationConfig(
        config_groups={"group_0": recipe.scheme(TARGETS, group_size)},
        ignore=ignore,
        quantization_status=QuantizationStatus.FROZEN,
    )
    apply_quantization_config(model, config)
    quantized = [
        (name, module)
        for name, module in model.named_modules()
        if getattr(module, "quantization_scheme", None) is not None
    ]
    method = _weights_method(gptq, activation_aware)
    _say(f"quantizing {len(quantized)} Linear layers ({scheme}, {method}) ...")
    for name, module in quantized:
        scheme_args = module.quantization_scheme
        if gptq:
            if name not in hessians:
                raise RuntimeError(f"no calibration input reached {name}")
            _gptq_weights(module, scheme_args.weights, hessians.pop(name))
        else:
            recipe.weight_quantizer(module, scheme_args.weights)
        if recipe.static_inputs:
            if name not in observed:
                raise RuntimeError(f"no calibration input reached {name}")
            low, high = observed[name]
            scale, zero_point = calculate_qparams(
                low.reshape(1), high.reshape(1), scheme_args.input_activations
            )
            with torch.no_grad():
                module.input_scale.copy_(scale)
                if hasattr(module, "input_zero_point"):
                    module.input_zero_point.copy_(zero_point)
        module.quantization_status = QuantizationStatus.FROZEN

    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=recipe.format)
    compressor.compress_model(model)
    _say("writing the compressed safetensors ...")
    model.save_pretrained(target)
    if moe_ignore:
        experts = _quantize_saved_experts(target, recipe.scheme(TARGETS, group_size), recipe.format)
        _say(f"quantized {experts} routed expert weights ({scheme})")
        # compressed-tensors lists the Linears it left unquantized; the routers are not
        # Linears in transformers 5, so the recipe's patterns are written instead.
        compressor.quantization_config.ignore = ignore
    compressor.update_config(str(target))
    _copy_extras(source, target)
    return group_size


def _quantize_saved_experts(folder: Path, scheme, quantization_format: str) -> int:
    """Quantize the per-expert weights save_pretrained wrote into `folder`, each like a
    Linear of `scheme` (compressed-tensors' min-max qparams and its compressor of
    `quantization_format`): int8 `weight` and `weight_scale`, or pack-quantized
    `weight_packed`, `weight_scale`, `weight_shape` (and `weight_zero_point` when
    asymmetric); returns how many."""
    import torch
    from compressed_tensors.compressors import (
        IntQuantizationCompressor,
        PackedQuantizationCompressor,
    )
    from safetensors import safe_open
    from safetensors.torch import save_file

    compressor = {
        "int-quantized": IntQuantizationCompressor,
        "pack-quantized": PackedQuantizationCompressor,
    }[quantization_format]
    args = scheme.weights
    index_file = next(folder.glob("*.safetensors.index.json"), None)
    index = json.loads(index_file.read_text()) if index_file else None
    count = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        experts = [
            name
            for name, tensor in tensors.items()
            if _EXPERT_WEIGHT.search(name) and tensor.dim() == 2 and tensor.is_floating_point()
        ]
        for name in experts:
            weight = tensors.pop(name)
            module = name.removesuffix(".weight")
            with torch.no_grad():
                scale, zero_point = _min_max_qparams(weight, args)
                state = {"weight": weight, "weight_scale": scale.to(weight.dtype),
                         "weight_zero_point": zero_point}  # fmt: skip
                state = compressor.compress(state, scheme)
            if index is not None:
                del index["weight_map"][name]
            for leaf, tensor in state.items():
                tensors[f"{module}.{leaf}"] = tensor.contiguous()
                if index is not None:
                    index["weight_map"][f"{module}.{leaf}"] = path.name
        if experts:
            save_file(tensors, path, metadata=metadata)
            count += len(experts)
    if index is not None:
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return count


def _refuse_for_moe(source: Path, scheme: str) -> None:
    if scheme in _TOOL_FORMATS:
        if _moe_ignore(_tensor_names(source)):
            raise ValueError(
                f"{source} is an MoE model: scheme {scheme!r} is written for dense models only "
                "(its routed experts are not packed in that format); use w4a16"
            )
        return
    recipe = _RECIPES[scheme]
    eight_bit_weight_only = recipe.weights["num_bits"] == 8 and recipe.input_activations is None
    if eight_bit_weight_only and _moe_ignore(_tensor_names(source)):
        raise ValueError(
            f"{source} is an MoE model: scheme {scheme!r} is written for dense models only "
            "(8-bit weight-only MoE experts have no plugin kernel); use w4a16 or w8a8-dynamic"
        )
    inputs = recipe.input_activations
    dynamic_token = inputs is not None and inputs["dynamic"] and inputs["strategy"] == "token"
    weight_only = inputs is None
    if recipe.smooth and _moe_ignore(_tensor_names(source)):
        raise ValueError(
            f"{source} is an MoE model: scheme {scheme!r} smooths dense MLPs only (its routed "
            "experts would not be smoothed); use w8a8-dynamic"
        )
    if not (dynamic_token or weight_only) and _moe_ignore(_tensor_names(source)):
        raise ValueError(
            f"{source} is an MoE model: scheme {scheme!r} is not supported for it (vLLM's W8A8 "
            "int8 MoE layers need dynamic per-token activations); use w8a8-dynamic"
        )


def _write_tool_format(source: Path, target: Path, scheme: str, gptq: bool = False,
                       activation_aware: bool = False) -> int:  # fmt: skip
    """Write the GPTQ or AWQ checkpoint (quantized_int4) of `scheme`; returns the group
    size. Quantized Linears become the format's tensors, every other floating tensor
    float16, as the tools save their models. The weights are rounded to nearest, or
    quantized with GPTQ (`gptq`); act-order takes its channel order from the Hessians'
    diagonal either way."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from vllm_kunlun import __version__
    from vllm_kunlun.model_zoo import quantized_int4 as int4

    tool = _TOOL_FORMATS[scheme]
    _say(f"loading {source} ...")
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto").eval()
    linears = _linears(model)
    group_size = _choose_group_size(scheme, {n: m.in_features for n, m in linears.items()})
    narrow = [name for name, m in linears.items() if m.out_features % int4.PACK]
    if narrow:
        raise ValueError(f"{scheme}: output sizes not a multiple of 8: {', '.join(narrow)}")
    if activation_aware:
        _activation_aware(model, source, scheme, group_size)
    # Without GPTQ the Hessians are only needed for act-order's channel order (their
    # diagonal); computing the whole matrices keeps one calibration path.
    hessians = _hessians(model, source, linears) if gptq or tool.act_order else {}
    unreached = [name for name in linears if hessians and name not in hessians]
    if unreached:
        raise RuntimeError(f"no calibration input reached {', '.join(unreached)}")
    source_tensors = _read_tensors(source)
    if activation_aware:  # the scaled and clipped weights and norms
        state = model.state_dict()
        source_tensors = {name: state.get(name, tensor).to(tensor.dtype)
                          for name, tensor in source_tensors.items()}  # fmt: skip
    absent = [name for name in linears if f"{name}.weight" not in source_tensors]
    if absent:
        raise RuntimeError(f"Linear weights not found in {source}: {', '.join(absent)}")

    method = _weights_method(gptq, activation_aware)
    _say(f"quantizing {len(linears)} Linear layers ({scheme}, {method}) ...")
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in source_tensors.items():
        module, _, leaf = name.rpartition(".")
        if module in linears and leaf == "weight":
            hessian = hessians.pop(module, None)
            order = int4.act_order(torch.diagonal(hessian)) if tool.act_order else None
            hessian = hessian if gptq else None  # None: round to nearest
            if tool.format == "gptq":
                packed = int4.gptq_tensors(tensor, group_size, order, hessian)
            else:
                packed = int4.awq_tensors(tensor, group_size, hessian)
            tensors.update({f"{module}.{key}": value for key, value in packed.items()})
        else:
            tensors[name] = tensor.to(torch.float16) if tensor.is_floating_point() else tensor
    target.mkdir(parents=True)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})

    quantizer = f"vllm-kunlun:{__version__}"
    if tool.format == "gptq":
        quantization_config = int4.gptq_config(group_size, tool.act_order, quantizer)
        text = json.dumps(quantization_config, indent=2) + "\n"
        (target / "quantize_config.json").write_text(text)
    else:
        quantization_config = int4.awq_config(group_size)
    config = json.loads((source / "config.json").read_text())
    config.update(dtype="float16", quantization_config=quantization_config)
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _copy_extras(source, target)
    return group_size


def _read_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def make_quantized_checkpoint(
    source: Path, target: Path, scheme: str, *, gptq: bool = False, activation_aware: bool = False
) -> Path:
    """Write the `scheme` quantization of the checkpoint folder `source` to `target` (which
    must not exist or be empty); the folder appears complete or not at all. `gptq`: quantize
    a 4-bit scheme's weights with GPTQ instead of rounding to nearest (experimental: see the
    module docstring). `activation_aware`: scale and clip the float weights first
    (model_zoo.activation_aware), then round to nearest."""
    source, target = Path(source), Path(target)
    _check_scheme(scheme)
    _check_weights_method(scheme, gptq, activation_aware)
    _check_source(source)
    _refuse_for_moe(source, scheme)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} already exists and is not empty")
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write = _write_tool_format if scheme in _TOOL_FORMATS else _write
        group_size = write(source, staging, scheme, gptq, activation_aware)
        marker = _marker(source, scheme, group_size, gptq, activation_aware)
        (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if target.exists():
            target.rmdir()  # empty (checked above); raises if something appeared since
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _say(f"{scheme} checkpoint ready in {time.monotonic() - started:.1f} s: {target}")
    return target


def is_complete(folder: Path, source: Path, scheme: str, *, gptq: bool = False,
                activation_aware: bool = False) -> bool:  # fmt: skip
    """Whether `folder` holds the `scheme` quantization of the current `source` files
    (with GPTQ's weights when `gptq`, activation-aware ones when `activation_aware`, else
    rounded to nearest)."""
    try:
        written = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    group_size = written.get("group_size") if isinstance(written, dict) else None
    if _grouped(scheme) != isinstance(group_size, int):
        return False
    return written == _marker(Path(source), scheme, group_size, gptq, activation_aware)


def quantized_checkpoint(
    source: Path, scheme: str, cache_root: Path, *, gptq: bool = False,
    activation_aware: bool = False,
) -> Path:  # fmt: skip
    """The `scheme` quantization of `source` under `cache_root`, made on first use; a GPTQ or
    activation-aware copy has a folder of its own (suffix "-gptq", "-activation-aware")."""
    source, cache_root = Path(source), Path(cache_root)
    _check_scheme(scheme)
    _check_weights_method(scheme, gptq, activation_aware)
    digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:10]
    method = f"-{_weights_method(gptq, activation_aware)}" if gptq or activation_aware else ""
    target = cache_root / f"{source.name}-{scheme}{method}-{digest}"
    how = {"gptq": gptq, "activation_aware": activation_aware}
    if is_complete(target, source, scheme, **how):
        return target
    shutil.rmtree(target, ignore_errors=True)  # stale or incomplete
    try:
        return make_quantized_checkpoint(source, target, scheme, **how)
    except OSError:
        if is_complete(target, source, scheme, **how):  # another process made it meanwhile
            return target
        raise


def main(argv: list[str] | None = None) -> int:
    """`vllm-kunlun quantize SOURCE TARGET --scheme S [--gptq | --activation-aware]`."""
    schemes = "\n".join(f"  {name:18} {text}" for name, text in SCHEMES.items())
    parser = argparse.ArgumentParser(
        prog="vllm-kunlun quantize",
        description="Write a quantized copy of an unquantized Hugging Face checkpoint folder "
        "(safetensors) in a format that vLLM loads: compressed-tensors, GPTQ or AWQ.",
        epilog=f"schemes:\n{schemes}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", type=Path, help="unquantized checkpoint folder")
    parser.add_argument("target", type=Path, help="new folder for the quantized checkpoint")
    parser.add_argument("--scheme", required=True, help=f"one of: {', '.join(SCHEMES)}")
    parser.add_argument(
        "--gptq",
        action="store_true",
        help="GPTQ error compensation (per-layer second-order) with Hessians from the "
        "built-in calibration text (about 1,800 tokens): experimental; on the default model "
        "it raised perplexity above round to nearest, because that text is too short for "
        "layers this wide",
    )
    parser.add_argument(
        "--activation-aware",
        action="store_true",
        help="for the 4-bit schemes: search activation-aware per-channel scales and per-group "
        "clipping on the built-in calibration text before rounding to nearest (AWQ's "
        "algorithm; Llama-style layers); on the default model it roughly halves the "
        "perplexity increase",
    )
    args = parser.parse_args(argv)
    try:
        make_quantized_checkpoint(args.source, args.target, args.scheme, gptq=args.gptq,
                                  activation_aware=args.activation_aware)  # fmt: skip
    except (OSError, ValueError) as error:
        sys.stderr.write(f"vllm-kunlun quantize: {error}\n")
        return 2
    print(args.target)
    return 0
