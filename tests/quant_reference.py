"""Independent reference for quantized (compressed-tensors W8A8 int8) checkpoints.

The quantized folder is read here directly (safetensors + config.json), not through
compressed-tensors' decompression nor through vllm_kunlun: a float32 transformers model is
built from the config without its quantization_config, the int8 weights are dequantized into
it (w = q * weight_scale, per output channel), and forward pre-hooks on every quantized
Linear fake-quantize its input the way the scheme's int8 kernel sees it:

    dynamic per token, symmetric: scale = absmax(row) / 127, q = clamp(round(x / scale), -127, 127)
    static, symmetric:            q = clamp(round(x / input_scale), -128, 127)
    static, asymmetric:           q = clamp(round(x / input_scale) + zp, -128, 127)

and x' = (q - zp) * scale. Greedy decoding then follows tests/engine.py's `hf_greedy`.

MoE checkpoints (dynamic per token only, as vLLM's W8A8 int8 MoE): the routed experts are
saved per expert (`...experts.E.gate_proj.weight`, `up_proj`, `down_proj`, or Mixtral's
`w1`, `w3`, `w2`), each int8 with a per-channel `weight_scale`; they are dequantized the same
way and stacked into transformers 5's fused expert parameters (`gate_up_proj` [E, 2I, H] =
gate rows then up rows, `down_proj` [E, H, I]). Those experts are not Linears and cannot be
hooked per projection, so the experts module's forward is replaced, on the instance, by
`ExpertLoop`: a plain per-token, per-selected-expert loop mirroring transformers' own expert
computation, with the fake quantization in front of gate/up and in front of down. Routing
stays the model's own (its router computes the top-k indices and weights it passes in).

Weight-only 4-bit checkpoints (compressed-tensors pack-quantized W4A16, GPTQ, AWQ) are
dequantized here from their packed tensors, with unpacking written from the formats (value
i of an int32 word in bits 4i..4i+3), and loaded without any activation quantization:

    pack-quantized: weight_packed [N, K/8] along K, stored q + 8; weight_scale [N, G'];
                    weight_zero_point [N/8, G'] along N, stored z + 8 (asymmetric only);
                    w = (q - z) * scale, group of k = k // (K / G'). 8-bit weights (W8A16):
                    four values a word (bits 8i..8i+7), stored q + 128
    GPTQ (v1):      qweight [K/8, N] along K; qzeros [G', N/8] along N storing z - 1;
                    scales [G', N]; w[n, k] = (q - z) * scale at group g_idx[k]
    AWQ (GEMM):     qweight [K, N/8] and qzeros [G', N/8] along N, value i of a word being
                    element AWQ_ORDER[i] of its eight; scales [G', N]; group of k = k // G
"""

import json
import re
from pathlib import Path

import torch


def fake_quant_dynamic_per_token(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per row (token) with scale absmax / 127; rows of zeros stay zero."""
    x32 = x.float()
    scale = x32.abs().amax(dim=-1, keepdim=True) / 127.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(x32 / safe), -127, 127)
    return torch.where(scale == 0, torch.zeros_like(x32), q * scale).to(x.dtype)


def fake_quant_static(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-tensor int8 with a fixed scale (and zero point when asymmetric)."""
    scale = scale.float().reshape(())
    zp = torch.zeros(()) if zero_point is None else zero_point.float().reshape(())
    q = torch.clamp(torch.round(x.float() / scale) + zp, -128, 127)
    return ((q - zp) * scale).to(x.dtype)


def _read_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _input_args(quantization_config: dict) -> dict | None:
    """The input-activation args of the (single) config group that targets Linear."""
    groups = [g for g in quantization_config["config_groups"].values() if "Linear" in g["targets"]]
    assert len(groups) == 1, f"expected one Linear group, got {quantization_config}"
    return groups[0].get("input_activations")


#: A routed expert's weight as saved: layer, expert, projection.
_EXPERT_WEIGHT = re.compile(
    r"^(?P<layer>.+\.layers\.\d+)\.\w+\.experts\.(?P<expert>\d+)\.(?P<proj>\w+)$"
)
#: Position of each projection name: gate (w1), up (w3), down (w2).
_EXPERT_PROJECTIONS = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": 2, "w2": 2}
#: Saved name -> transformers 5 module name, outside the experts (Mixtral's router; ERNIE-4.5
#: MoE's correction bias, which transformers' checkpoint conversion also moves into the gate).
_RENAMED = {".block_sparse_moe.": ".mlp.", ".mlp.moe_statics.": ".mlp.gate.moe_statics."}


class ExpertLoop:
    """Forward of a transformers 5 fused experts module (`gate_up_proj` [E, 2I, H],
    `down_proj` [E, H, I], `act_fn`), same arguments and result, written as a plain loop.

    It mirrors transformers' own expert computation (the eager `Experts.forward` of Qwen3-MoE,
    Mixtral, Qwen2-MoE, ...): per token, per selected expert k (an index equal to
    num_experts is skipped, as there): x' = fake_quant(x), gate, up = x' @ gate_up^T split in
    halves, h = fake_quant(act(gate) * up), y = h @ down^T, and the output is the sum of
    top_k_weights[k] * y. With `fake_quant` None it computes exactly what transformers does.
    """

    def __init__(self, experts: torch.nn.Module, fake_quant=None):
        self.experts = experts
        self.fake_quant = fake_quant or (lambda x: x)

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        experts, fake_quant = self.experts, self.fake_quant
        out = torch.zeros_like(hidden_states)
        for token in range(hidden_states.shape[0]):
            x = fake_quant(hidden_states[token : token + 1])
            for k in range(top_k_index.shape[1]):
                expert = int(top_k_index[token, k])
                if expert >= experts.num_experts:
                    continue
                projected = torch.nn.functional.linear(x, experts.gate_up_proj[expert])
                gate, up = projected.chunk(2, dim=-1)
                h = fake_quant(experts.act_fn(gate) * up)
                y = torch.nn.functional.linear(h, experts.down_proj[expert])
                out[token] += (y[0] * top_k_weights[token, k]).to(out.dtype)
        return out


def _fuse_experts(state: dict[str, torch.Tensor], model) -> set[str]:
    """Move the per-expert weights of `state` into `model`'s fused expert parameters' names;
    returns the names of the experts modules filled."""
    per_layer: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
    for name in [n for n in state if n.endswith(".weight")]:
        found = _EXPERT_WEIGHT.match(name.removesuffix(".weight"))
        if found and found["proj"] in _EXPERT_PROJECTIONS:
            key = (int(found["expert"]), _EXPERT_PROJECTIONS[found["proj"]])
            per_layer.setdefault(found["layer"], {})[key] = state.pop(name)
    fused = {
        name: module
        for name, module in model.named_modules()
        if isinstance(getattr(module, "gate_up_proj", None), torch.nn.Parameter)
    }
    filled = set()
    for layer, weights in per_layer.items():
        [name] = [n for n in fused if n.startswith(f"{layer}.")]
        count = fused[name].num_experts
        assert set(weights) == {(e, p) for e in range(count) for p in range(3)}, layer
        gate_up = [torch.cat([weights[e, 0], weights[e, 1]]) for e in range(count)]
        state[f"{name}.gate_up_proj"] = torch.stack(gate_up)
        state[f"{name}.down_proj"] = torch.stack([weights[e, 2] for e in range(count)])
        filled.add(name)
    known = set(model.state_dict())
    for name in [n for n in state if n not in known]:
        for old, new in _RENAMED.items():
            if name.replace(old, new) in known:
                state[name.replace(old, new)] = state.pop(name)
    return filled


#: AWQ's order: value i of a packed word is element AWQ_ORDER[i] of its eight along N.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_int4(words: torch.Tensor, dim: int, order=tuple(range(8))) -> torch.Tensor:
    """The 4-bit values (0..15, int64) of int32 `words`, eight per word along `dim`: value i
    (bits 4i..4i+3) of a word is element order[i] of its eight."""
    shifts = torch.arange(8, dtype=torch.int64) * 4
    values = (words.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF  # [..., 8] by slot
    placed = torch.empty_like(values)
    placed[..., list(order)] = values  # slot i -> element order[i]
    placed = placed.movedim(dim, -2)
    placed = placed.reshape(*placed.shape[:-2], -1)
    return placed.movedim(-1, dim)


def unpack_bytes(words: torch.Tensor, dim: int) -> torch.Tensor:
    """The 8-bit values (0..255, int64) of int32 `words`, four per word along `dim`: value i
    (bits 8i..8i+7) is element i of its four."""
    shifts = torch.arange(4, dtype=torch.int64) * 8
    values = (words.to(torch.int64).unsqueeze(-1) >> shifts) & 0xFF  # [..., 4]
    values = values.movedim(dim, -2)
    values = values.reshape(*values.shape[:-2], -1)
    return values.movedim(-1, dim)


def _pack_quantized_weight(leaves: dict[str, torch.Tensor]) -> torch.Tensor:
    n, k = (int(v) for v in leaves["weight_shape"])
    eight_bit = leaves["weight_packed"].shape[1] * 4 == k  # four values a word, else eight
    unpack = unpack_bytes if eight_bit else unpack_int4
    q = unpack(leaves["weight_packed"], dim=1)[:, :k]  # [N, K], stored q + 8 (q + 128)
    scale = leaves["weight_scale"].float()  # [N, G']
    zero = torch.full(scale.shape, 128 if eight_bit else 8, dtype=q.dtype)
    if "weight_zero_point" in leaves:  # asymmetric: [N/8, G'] (8-bit: [N/4, G']) along N
        zero = unpack(leaves["weight_zero_point"], dim=0)[:n]
    group = k // scale.shape[1]
    expand = lambda t: t.repeat_interleave(group, dim=1)  # noqa: E731
    return (q - expand(zero)).float() * expand(scale)


def _gptq_weight(leaves: dict[str, torch.Tensor]) -> torch.Tensor:
    q = unpack_int4(leaves["qweight"], dim=0)  # [K, N]
    zero = unpack_int4(leaves["qzeros"], dim=1) + 1  # [G', N], stored z - 1
    g_idx = leaves["g_idx"].long()
    scale = leaves["scales"].float()
    return ((q - zero[g_idx]).float() * scale[g_idx]).t()


def _awq_weight(leaves: dict[str, torch.Tensor]) -> torch.Tensor:
    q = unpack_int4(leaves["qweight"], dim=1, order=AWQ_ORDER)  # [K, N]
    zero = unpack_int4(leaves["qzeros"], dim=1, order=AWQ_ORDER)  # [G', N]
    scale = leaves["scales"].float()
    group = q.shape[0] // scale.shape[0]
    expand = lambda t: t.repeat_interleave(group, dim=0)  # noqa: E731
    return ((q - expand(zero)).float() * expand(scale)).t()


def _int4_format(quantization_config: dict) -> str | None:
    """'pack-quantized', 'gptq' or 'awq' for a weight-only 4-bit checkpoint, else None."""
    method = quantization_config["quant_method"]
    if method == "gptq":
        assert quantization_config["bits"] == 4 and quantization_config["sym"] is True
        assert quantization_config.get("checkpoint_format", "gptq") == "gptq"
        return "gptq"
    if method == "awq":
        assert quantization_config["bits"] == 4 and quantization_config["zero_point"] is True
        assert quantization_config["version"] == "gemm"
        return "awq"
    if quantization_config["format"] == "pack-quantized":
        assert _input_args(quantization_config) is None, "weight-only"
        return "pack-quantized"
    return None


#: The tensors of one quantized module per format: the leaf that marks it, then the reader.
_INT4_FORMATS = {
    "pack-quantized": ("weight_packed", _pack_quantized_weight),
    "gptq": ("qweight", _gptq_weight),
    "awq": ("qweight", _awq_weight),
}


def dequantize_int4(tensors: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors in float32 with each 4-bit module's packed tensors replaced
    by its dequantized `<module>.weight` [N, K]."""
    marker, read = _INT4_FORMATS[fmt]
    modules = {name[: -len(marker) - 1] for name in tensors if name.endswith(f".{marker}")}
    state: dict[str, torch.Tensor] = {}
    leaves: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        module, _, leaf = name.rpartition(".")
        if module in modules and leaf != "bias":
            leaves.setdefault(module, {})[leaf] = tensor
        else:
            state[name] = tensor.float()
    for module, parts in leaves.items():
        state[f"{module}.weight"] = read(parts)
    return state


def _float_model(checkpoint: Path):
    """The float32 transformers model of the checkpoint's config (no weights) and the
    quantization config."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    config_dict = json.loads((checkpoint / "config.json").read_text())
    quantization_config = config_dict.pop("quantization_config")
    config = CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict)
    # Eager attention, as hf_greedy.
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return model, quantization_config


def _load_state(model, state: dict[str, torch.Tensor]) -> set[str]:
    """Load `state` (per-expert weights fused) into `model`; returns the experts modules."""
    experts = _fuse_experts(state, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(model.config, "tie_word_embeddings", False)
    assert not unexpected, unexpected
    assert set(missing) <= ({"lm_head.weight"} if tied else set()), missing
    if tied:
        model.tie_weights()
    return experts


def load_fake_quant_model(checkpoint: str | Path):
    """The float32 transformers model of a quantized checkpoint, with activation fake-quant
    (W8A8), or only its dequantized weights (weight-only 4-bit)."""
    checkpoint = Path(checkpoint)
    model, quantization_config = _float_model(checkpoint)
    tensors = _read_tensors(checkpoint)
    int4 = _int4_format(quantization_config)
    if int4 is not None:
        _load_state(model, dequantize_int4(tensors, int4))
        return model
    assert quantization_config["quant_method"] == "compressed-tensors"
    assert quantization_config["format"] == "int-quantized", quantization_config["format"]

    state: dict[str, torch.Tensor] = {}
    quantized: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf in ("weight_scale", "input_scale", "input_zero_point"):
            quantized.setdefault(module, {})[leaf] = tensor
        elif leaf == "weight" and f"{module}.weight_scale" in tensors:
            assert tensor.dtype == torch.int8, (name, tensor.dtype)
            scale = tensors[f"{module}.weight_scale"].float()
            state[name] = tensor.float() * scale  # [N, K] * [N, 1]
        else:
            state[name] = tensor.float()
    experts = _load_state(model, state)
    args = _input_args(quantization_config)
    modules = dict(model.named_modules())
    if experts:
        assert args is not None and args["dynamic"] is True, "MoE: dynamic per token only"
        assert args["strategy"] == "token" and args["symmetric"], args
        for name in experts:
            modules[name].forward = ExpertLoop(modules[name], fake_quant_dynamic_per_token)
    for name, params in quantized.items():
        if _EXPERT_WEIGHT.match(name):
            continue
        linear = modules[name]
        assert isinstance(linear, torch.nn.Linear), name
        if args is None:
            continue
        if args["dynamic"] is True:
            assert args["strategy"] == "token" and args["symmetric"], args
            linear.register_forward_pre_hook(
                lambda _m, inputs: (fake_quant_dynamic_per_token(inputs[0]), *inputs[1:])
            )
        else:
            assert args["strategy"] == "tensor", args
            scale = params["input_scale"]
            zero_point = None if args["symmetric"] else params["input_zero_point"]

            def hook(_m, inputs, scale=scale, zero_point=zero_point):
                return (fake_quant_static(inputs[0], scale, zero_point), *inputs[1:])

            linear.register_forward_pre_hook(hook)
    return model


def hf_fake_quant_greedy(
    checkpoint: str | Path, prompts: list[str], max_tokens: int
) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy continuations (token ids) of the fake-quantized float32 model, as hf_greedy, and
    at each generated position the margin between the best and the second-best logit."""
    from transformers import AutoTokenizer

    from tests.engine import greedy_loop

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return greedy_loop(load_fake_quant_model(checkpoint), tokenizer, prompts, max_tokens)
