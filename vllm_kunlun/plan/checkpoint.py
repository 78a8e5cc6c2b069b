"""What a checkpoint folder holds, from its safetensors index and file headers only.

A safetensors file starts with an 8-byte little-endian header length and a JSON header naming
each tensor's dtype, shape and byte range; the plan reads those bytes and nothing else.
"""

import json
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class CheckpointFacts:
    files: int
    tensors: int
    #: Bytes of tensor data in the files.
    tensor_bytes: int
    #: Tensor bytes by safetensors dtype ("BF16", "I32", ...).
    bytes_by_dtype: dict[str, int]


def _header(path: Path) -> dict:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def _files(folder: Path) -> list[Path]:
    index = folder / INDEX
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    return sorted(folder.glob("*.safetensors"))


def read_checkpoint(folder: Path) -> CheckpointFacts | None:
    """The tensors of `folder`'s safetensors files, or None when it has none (a config only)."""
    files = [f for f in _files(folder) if f.exists()]
    if not files:
        return None
    by_dtype: Counter[str] = Counter()
    tensors = 0
    for path in files:
        for name, entry in _header(path).items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            by_dtype[entry["dtype"]] += end - start
            tensors += 1
    return CheckpointFacts(len(files), tensors, sum(by_dtype.values()), dict(by_dtype))
