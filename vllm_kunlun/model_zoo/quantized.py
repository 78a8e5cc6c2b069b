"""Quantized checkpoints made offline from an unquantized Hugging Face folder.

    make_quantized_checkpoint(source, target, scheme)   write one quantized folder
    quantized_checkpoint(source, scheme, cache_root)    the same, made once and reused
    vllm-kunlun quantize SOURCE TARGET --scheme S       the same from the command line

The folders are written by compressed-tensors itself, the way LLM Compressor writes them:
the quantization config is attached to the transformers model (`apply_quantization_config`),
its scales are filled in, `ModelCompressor` compresses the weights, the model is saved with
`save_pretrained` and `ModelCompressor.update_config` writes config.json's
`quantization_config`. Scales and zero points come from compressed-tensors'
`calculate_qparams` (min-max; symmetric int8 scale = absmax / 127.5, values clamped to
[-128, 127]); weights are rounded to nearest, with no calibration beyond the static input
scales, which come from running the float model on CALIBRATION_PROMPTS.

Every nn.Linear but `lm_head` is quantized (the decoder layers' projections, fused ones
included); embeddings, norms and `lm_head` keep the source dtype. A recipe in _RECIPES says
what to write for a scheme: new schemes (GPTQ, AWQ, W4A16) add a recipe, with their own
weight quantizer where round-to-nearest is not the method.

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

MoE models (w8a8-dynamic only: vLLM's W8A8 int8 MoE method takes dynamic per-token
activations and refuses static input scales): transformers 5 keeps the routed experts as
fused 3-D parameters, not nn.Linear, so compressed-tensors leaves them alone and
`save_pretrained` writes them as per-expert 2-D tensors (`...experts.E.gate_proj.weight`,
or `w1`/`w2`/`w3` for Mixtral), the names vLLM's expert loader maps. Those saved tensors are
then quantized explicitly, each like a Linear (compressed-tensors' `calculate_qparams` and
`IntQuantizationCompressor.compress`, int8 per output channel, `weight_scale` [N, 1]), next
to the Linears compressed-tensors wrote. The one config group still targets `Linear`
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


def _round_to_nearest(module, args) -> None:
    """Min-max weight scales (and zero points) per the weight args, as compressed-tensors
    computes them; the compressor then rounds the weight to nearest."""
    import torch
    from compressed_tensors.quantization.utils import calculate_qparams

    if args.strategy not in ("channel", "tensor"):
        raise NotImplementedError(f"min-max weight scales per {args.strategy} are not written")
    weight = module.weight.detach()
    dims = dict(keepdim=True, dim=1) if args.strategy == "channel" else {}
    with torch.no_grad():
        scale, zero_point = calculate_qparams(weight.amin(**dims), weight.amax(**dims), args)
        module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.copy_(zero_point.reshape(module.weight_zero_point.shape))


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

    def scheme(self, targets: list[str]):
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        inputs = self.input_activations
        return QuantizationScheme(
            targets=targets,
            weights=QuantizationArgs(**self.weights),
            input_activations=QuantizationArgs(**inputs) if inputs is not None else None,
        )

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
}  # fmt: skip

#: Scheme name -> description.
SCHEMES: dict[str, str] = {name: recipe.description for name, recipe in _RECIPES.items()}

#: Module targets and ignored modules written in the config (LLM Compressor's usual recipe).
TARGETS = ["Linear"]
IGNORE = ["lm_head"]


def _recipe(scheme: str) -> _Recipe:
    if scheme not in _RECIPES:
        raise ValueError(
            f"unknown quantization scheme {scheme!r}; supported: {', '.join(_RECIPES)}"
        )
    return _RECIPES[scheme]


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


def _marker(source: Path, scheme: str) -> dict:
    import compressed_tensors

    return {
        "source": str(source.resolve()),
        "scheme": scheme,
        "format": _RECIPES[scheme].format,
        "compressed_tensors": compressed_tensors.__version__,
        "source_files": _fingerprint(source),
    }


def _write(source: Path, target: Path, scheme: str) -> None:
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
    linears = {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in IGNORE
    }
    if recipe.smooth:
        factors = smooth_mlps(model, AutoTokenizer.from_pretrained(source))
        _say(f"smoothed the down_proj inputs of {len(factors)} MLPs (alpha {SMOOTH_ALPHA})")
    observed = {}
    if recipe.static_inputs:
        _say(f"calibrating input scales on {len(CALIBRATION_PROMPTS)} prompts ...")
        observed = _calibrate(model, AutoTokenizer.from_pretrained(source), linears)

    config = QuantizationConfig(
        config_groups={"group_0": recipe.scheme(TARGETS)},
        ignore=ignore,
        quantization_status=QuantizationStatus.FROZEN,
    )
    apply_quantization_config(model, config)
    quantized = [
        (name, module)
        for name, module in model.named_modules()
        if getattr(module, "quantization_scheme", None) is not None
    ]
    _say(f"quantizing {len(quantized)} Linear layers ({scheme}) ...")
    for name, module in quantized:
        scheme_args = module.quantization_scheme
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
        experts = _quantize_saved_experts(target, recipe.scheme(TARGETS))
        _say(f"quantized {experts} routed expert weights ({scheme})")
        # compressed-tensors lists the Linears it left unquantized; the routers are not
        # Linears in transformers 5, so the recipe's patterns are written instead.
        compressor.quantization_config.ignore = ignore
    compressor.update_config(str(target))
    # Tokenizer files, chat template and the like.
    weights = {".safetensors", ".bin", ".pt", ".pth", ".gguf"}
    for path in sorted(source.iterdir()):
        wanted = path.is_file() and not path.name.startswith(".") and path.suffix not in weights
        if wanted and ".index." not in path.name and not (target / path.name).exists():
            shutil.copy(path, target / path.name)


def _quantize_saved_experts(folder: Path, scheme) -> int:
    """Quantize the per-expert weights save_pretrained wrote into `folder`, each like a
    Linear of `scheme` (compressed-tensors' min-max qparams and int compressor), adding
    their `weight_scale`; returns how many."""
    import torch
    from compressed_tensors.compressors import IntQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors import safe_open
    from safetensors.torch import save_file

    args = scheme.weights
    assert args.strategy == "channel" and args.symmetric, args
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
            weight = tensors[name]
            dims = dict(dim=1, keepdim=True)
            with torch.no_grad():
                scale, zero_point = calculate_qparams(
                    weight.amin(**dims), weight.amax(**dims), args
                )
                state = {"weight": weight, "weight_scale": scale.to(weight.dtype),
                         "weight_zero_point": zero_point}  # fmt: skip
                state = IntQuantizationCompressor.compress(state, scheme)
            scale_name = f"{name}_scale"
            tensors[name] = state["weight"].contiguous()
            tensors[scale_name] = state["weight_scale"].contiguous()
            if index is not None:
                index["weight_map"][scale_name] = path.name
        if experts:
            save_file(tensors, path, metadata=metadata)
            count += len(experts)
    if index is not None:
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return count


def _refuse_static_moe(source: Path, scheme: str) -> None:
    recipe = _RECIPES[scheme]
    inputs = recipe.input_activations
    dynamic_token = inputs is not None and inputs["dynamic"] and inputs["strategy"] == "token"
    if recipe.smooth and _moe_ignore(_tensor_names(source)):
        raise ValueError(
            f"{source} is an MoE model: scheme {scheme!r} smooths dense MLPs only (its routed "
            "experts would not be smoothed); use w8a8-dynamic"
        )
    if not dynamic_token and _moe_ignore(_tensor_names(source)):
        raise ValueError(
            f"{source} is an MoE model: scheme {scheme!r} is not supported for it (vLLM's W8A8 "
            "int8 MoE layers need dynamic per-token activations); use w8a8-dynamic"
        )


def make_quantized_checkpoint(source: Path, target: Path, scheme: str) -> Path:
    """Write the `scheme` quantization of the checkpoint folder `source` to `target` (which
    must not exist or be empty); the folder appears complete or not at all."""
    source, target = Path(source), Path(target)
    _recipe(scheme)
    _check_source(source)
    _refuse_static_moe(source, scheme)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} already exists and is not empty")
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write(source, staging, scheme)
        (staging / MARKER).write_text(json.dumps(_marker(source, scheme), indent=2) + "\n")
        if target.exists():
            target.rmdir()  # empty (checked above); raises if something appeared since
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _say(f"{scheme} checkpoint ready in {time.monotonic() - started:.1f} s: {target}")
    return target


def is_complete(folder: Path, source: Path, scheme: str) -> bool:
    """Whether `folder` holds the `scheme` quantization of the current `source` files."""
    try:
        return json.loads((Path(folder) / MARKER).read_text()) == _marker(Path(source), scheme)
    except (OSError, ValueError):
        return False


def quantized_checkpoint(source: Path, scheme: str, cache_root: Path) -> Path:
    """The `scheme` quantization of `source` under `cache_root`, made on first use."""
    source, cache_root = Path(source), Path(cache_root)
    _recipe(scheme)
    digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:10]
    target = cache_root / f"{source.name}-{scheme}-{digest}"
    if is_complete(target, source, scheme):
        return target
    shutil.rmtree(target, ignore_errors=True)  # stale or incomplete
    try:
        return make_quantized_checkpoint(source, target, scheme)
    except OSError:
        if is_complete(target, source, scheme):  # another process made it meanwhile
            return target
        raise


def main(argv: list[str] | None = None) -> int:
    """`vllm-kunlun quantize SOURCE TARGET --scheme S`."""
    schemes = "\n".join(f"  {name:18} {text}" for name, text in SCHEMES.items())
    parser = argparse.ArgumentParser(
        prog="vllm-kunlun quantize",
        description="Write a quantized copy of an unquantized Hugging Face checkpoint folder "
        "(safetensors) in the compressed-tensors format that vLLM loads.",
        epilog=f"schemes:\n{schemes}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", type=Path, help="unquantized checkpoint folder")
    parser.add_argument("target", type=Path, help="new folder for the quantized checkpoint")
    parser.add_argument("--scheme", required=True, help=f"one of: {', '.join(SCHEMES)}")
    args = parser.parse_args(argv)
    try:
        make_quantized_checkpoint(args.source, args.target, args.scheme)
    except (OSError, ValueError) as error:
        sys.stderr.write(f"vllm-kunlun quantize: {error}\n")
        return 2
    print(args.target)
    return 0
