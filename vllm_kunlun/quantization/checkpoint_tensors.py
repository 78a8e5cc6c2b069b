"""Checking a W8A8 int8 checkpoint's tensors against its quantization_config, before loading.

vLLM's loader copies each checkpoint tensor into a parameter created from the config: a float
weight lands in an int8 parameter by silent truncation, and a missing scale is only noticed
after the worker has loaded everything else. Reading the safetensors headers (names, dtypes,
shapes; no data) in the engine process catches both, naming the tensor.
"""

from pathlib import Path

from vllm_kunlun.quantization.checkpoint_config import UnsupportedQuantization

WEIGHT, SCALE = ".weight", ".weight_scale"


def read_headers(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape) over every *.safetensors file in `folder`."""
    from safetensors import safe_open

    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                piece = f.get_slice(name)
                tensors[name] = (piece.get_dtype(), tuple(piece.get_shape()))
    return tensors


def corrupt(what: str, folder: Path) -> UnsupportedQuantization:
    return UnsupportedQuantization(
        f"The quantized checkpoint in {folder} does not match its quantization_config: {what}. "
        "Re-create it (for example with `vllm-kunlun quantize`, docs/quantization.md)."
    )


def check_int8_tensors(folder: Path, static: bool, asymmetric: bool) -> None:
    """Every int8-quantized linear layer of the checkpoint in `folder` has an int8 weight
    [N, K], a float scale per row or per tensor, and the input scale (and zero point) its
    static activations need. Folders without safetensors files are left to vLLM's loader."""
    tensors = read_headers(folder)
    if not tensors:
        return
    quantized = {name[: -len(SCALE)] for name in tensors if name.endswith(SCALE)}
    quantized |= {name[: -len(WEIGHT)] for name, (dtype, _) in tensors.items()
                  if name.endswith(WEIGHT) and dtype == "I8"}  # fmt: skip
    if not quantized:
        raise corrupt("no tensor is int8-quantized (no *.weight_scale, no int8 *.weight)", folder)
    for module in sorted(quantized):
        weight, scale = tensors.get(module + WEIGHT), tensors.get(module + SCALE)
        if weight is None:
            raise corrupt(f"{module}{WEIGHT} is missing", folder)
        if weight[0] != "I8" or len(weight[1]) != 2:
            raise corrupt(
                f"{module}{WEIGHT} is {weight[0]} {list(weight[1])}, expected int8 (I8) [N, K]",
                folder,
            )
        if scale is None:
            raise corrupt(f"{module}{SCALE} (the weight's scale) is missing", folder)
        rows = weight[1][0]
        count = 1
        for size in scale[1]:
            count *= size
        if scale[0] not in ("F32", "F16", "BF16") or count not in (1, rows):
            raise corrupt(
                f"{module}{SCALE} is {scale[0]} {list(scale[1])}; expected a float scale per "
                f"output row ([{rows}, 1]) or per tensor ([1])",
                folder,
            )
        needed = [".input_scale"] if static else []
        needed += [".input_zero_point"] if static and asymmetric else []
        for suffix in needed:
            if module + suffix not in tensors:
                raise corrupt(
                    f"{module}{suffix} is missing (the config's static activations need it)",
                    folder,
                )
