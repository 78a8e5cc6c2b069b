"""Checking a quantized checkpoint's tensors against its quantization_config, before loading.

vLLM's loader copies each checkpoint tensor into a parameter created from the config: a float
weight lands in an int8 parameter by silent truncation, and a missing scale is only noticed
after the worker has loaded everything else. Reading the safetensors headers (names, dtypes,
shapes; no data) in the engine process catches both, naming the tensor.
"""

from pathlib import Path

from vllm_kunlun.ops.quant.int4_layout import PACK
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


def _shape(tensors, name: str, folder: Path, dtypes: tuple[str, ...], what: str) -> tuple[int, int]:
    """The [rows, cols] of a required 2-D tensor of one of `dtypes`."""
    found = tensors.get(name)
    if found is None:
        raise corrupt(f"{name} ({what}) is missing", folder)
    dtype, shape = found
    if dtype not in dtypes or len(shape) != 2:
        raise corrupt(f"{name} is {dtype} {list(shape)}, expected a 2-D {'/'.join(dtypes)} {what}",
                      folder)  # fmt: skip
    return shape


def _expect(name: str, got: tuple[int, int], want: tuple[int, int], why: str, folder: Path):
    if tuple(got) != tuple(want):
        raise corrupt(f"{name} is {list(got)}, expected {list(want)} ({why})", folder)


FLOATS = ("F16", "BF16", "F32")
PACKED = ("I32",)


def _groups(depth: int, group_size: int, name: str, folder: Path) -> int:
    if group_size == -1:
        return 1
    if depth % group_size:
        raise corrupt(f"{name}: input size {depth} is not a multiple of the group size "
                      f"{group_size}", folder)  # fmt: skip
    return depth // group_size


def check_gptq_awq_tensors(
    folder: Path, kind: str, group_size: int, act_order: bool = False, bits: int = 4
) -> None:
    """Every quantized layer of a GPTQ (`qweight` [K / p, N] packed along K, p = 32 / bits) or
    AWQ (4-bit: `qweight` [K, N / 8] packed along N, `qzeros` [G, N / 8]) checkpoint has int32
    packed tensors and float `scales` [G, N] for the config's group size; with GPTQ
    act-order, a `g_idx` [K]."""
    pack = 32 // bits
    tensors = read_headers(folder)
    modules = sorted(name[: -len(".qweight")] for name in tensors if name.endswith(".qweight"))
    if tensors and not modules:
        raise corrupt(f"no tensor is {kind.upper()}-quantized (no *.qweight)", folder)
    for module in modules:
        rows, cols = _shape(tensors, module + ".qweight", folder, PACKED,
                            f"packed {bits}-bit weight")  # fmt: skip
        depth, channels = (rows * pack, cols) if kind == "gptq" else (rows, cols * PACK)
        groups = _groups(depth, group_size, module + ".qweight", folder)
        why = f"K {depth}, N {channels}, group size {group_size}"
        scales = _shape(tensors, module + ".scales", folder, FLOATS, "group scales")
        _expect(module + ".scales", scales, (groups, channels), why, folder)
        if kind == "awq":
            zeros = _shape(tensors, module + ".qzeros", folder, PACKED, "packed zero points")
            _expect(module + ".qzeros", zeros, (groups, channels // PACK), why, folder)
        if act_order:
            found = tensors.get(module + ".g_idx")
            if found is None:
                raise corrupt(f"{module}.g_idx (act-order's group of each input channel) is "
                              "missing", folder)  # fmt: skip
            if found[0] not in ("I32", "I64") or tuple(found[1]) != (depth,):
                raise corrupt(f"{module}.g_idx is {found[0]} {list(found[1])}, expected an "
                              f"integer [{depth}] (K)", folder)  # fmt: skip


def check_pack_quantized_tensors(folder: Path, group_size: int, bits: int = 4) -> None:
    """Every layer of a compressed-tensors pack-quantized checkpoint has `weight_packed` int32
    [N, K / p] (p = 32 / bits values a word) and `weight_scale` [N, G] for the config's group
    size."""
    pack = 32 // bits
    tensors = read_headers(folder)
    modules = sorted(name[: -len(".weight_packed")] for name in tensors
                     if name.endswith(".weight_packed"))  # fmt: skip
    if tensors and not modules:
        raise corrupt("no tensor is pack-quantized (no *.weight_packed)", folder)
    for module in modules:
        channels, words = _shape(tensors, module + ".weight_packed", folder, PACKED,
                                 f"packed {bits}-bit weight")  # fmt: skip
        depth = words * pack
        groups = _groups(depth, group_size, module + ".weight_packed", folder)
        scales = _shape(tensors, module + SCALE, folder, FLOATS, "group scales")
        why = f"K {depth}, N {channels}, group size {group_size}"
        _expect(module + SCALE, scales, (channels, groups), why, folder)
