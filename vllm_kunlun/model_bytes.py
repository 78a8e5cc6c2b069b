"""The bytes of device memory a built model's weights take: what the emulated XPU records after
loading, and what `vllm-kunlun plan` computes from a model built on the meta device.

Counted once each: parameters, buffers, and tensors layers keep as plain attributes (MLA's
absorbed W_UK_T / W_UV). On the emulated XPU, vLLM's CPU GEMM repacks unquantized linear
weights into host-only oneDNN / SGL buffers and leaves an empty parameter; those layers count
their weight (and bias) at the size and dtype a Kunlun XPU holds, not the host's packed copy.
"""

import torch
from torch import nn

#: Tensor attributes of layers that are not weights: attention layers' views of the KV cache.
_NOT_WEIGHTS = frozenset({"kv_cache"})


def _key_and_bytes(tensor: torch.Tensor) -> tuple[int, int]:
    """The identity of the storage `tensor` views (views and aliases share it; on the meta
    device too, unlike data pointers) and that storage's bytes."""
    storage = tensor.untyped_storage()
    return storage._cdata, storage.nbytes()


def _packed_linear_bytes(module: nn.Module) -> int | None:
    """The unpacked bytes of a linear layer whose weight vLLM's CPU GEMM packed away, else None."""
    weight = getattr(module, "weight", None)
    sizes = getattr(module, "output_partition_sizes", None)
    if not isinstance(weight, torch.Tensor) or weight.numel() or sizes is None:
        return None
    if not hasattr(module, "cpu_linear"):
        return None
    inputs = getattr(module, "input_size_per_partition", getattr(module, "input_size", 0))
    outputs = sum(sizes)
    bias = getattr(module, "bias", None)
    bias_values = bias.numel() if isinstance(bias, torch.Tensor) else 0
    return (outputs * inputs + bias_values) * weight.element_size()


def _module_tensors(module: nn.Module) -> list[torch.Tensor]:
    tensors = [t for t in module._parameters.values() if t is not None]
    tensors += [t for t in module._buffers.values() if t is not None]
    tensors += [v for name, v in vars(module).items()
                if isinstance(v, torch.Tensor) and name not in _NOT_WEIGHTS]  # fmt: skip
    return tensors


def device_weight_bytes(model: nn.Module) -> int:
    """Bytes of device memory `model`'s weights take (see the module docstring)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        packed = _packed_linear_bytes(module)
        if packed is not None:
            total += packed
            packed_away = (module._parameters.get(n) for n in ("weight", "bias"))
            seen.update(_key_and_bytes(t)[0] for t in packed_away if t is not None)
        for tensor in _module_tensors(module):
            key, nbytes = _key_and_bytes(tensor)
            if key in seen:
                continue
            seen.add(key)
            total += nbytes
    return total
