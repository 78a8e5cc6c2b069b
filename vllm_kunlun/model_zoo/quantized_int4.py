"""4-bit weight-only quantization in the GPTQ (AutoGPTQ / GPTQModel) and AWQ (AutoAWQ GEMM)
checkpoint formats: the tensor arithmetic and the config written.

The integers come from rounding to nearest (the default), or from GPTQ
(vllm_kunlun.model_zoo.gptq, opt-in) when the Linear's input Hessian is given; either way
each group's scale (and zero point) is the format's min-max formula below, for GPTQ over
the group's error-updated weights, and the integers are computed with the float16-rounded
scale that is stored, so the file dequantizes exactly to the quantizer's result. No
activation-aware scaling search is run for the AWQ format (the AWQ format, not the AWQ
algorithm).

Both formats pack eight 4-bit values into an int32, value i of a word in bits 4i..4i+3, and
dequantize a weight as w = (q - z) * scale, with one scale (and zero point) per group of
`group_size` input channels and output channel. For a Linear with weight [N, K] (out, in):

GPTQ (v1 checkpoint format, symmetric):
    qweight  int32 [K/8, N]   packed along K: word [r, n] holds q[n, 8r + i] in value i
    qzeros   int32 [G', N/8]  packed along N: the stored zero is z - 1 (7 for z = 8), so
                              0x77777777 for symmetric 4-bit (vLLM's uint4b8 kernels do
                              not read it: the zero point of the type is 8)
    scales   fp16  [G', N]    scale = 2 * absmax / 15 over the group (GPTQ's symmetric
                              min-max: zero point 8, q = clamp(round(w / scale) + 8, 0, 15))
    g_idx    int32 [K]        the group of each input channel
Without act-order groups are contiguous (g_idx[k] = k // G). With act-order (desc_act) the
input channels are quantized in an order of decreasing activation energy, as GPTQ orders
them by the diagonal of the Hessian X^T X, and each group is `group_size` consecutive
channels of that order: g_idx[k] = position of k in the order // G. qweight stays in the
original channel order.

AWQ (AutoAWQ's GEMM version, asymmetric):
    qweight  int32 [K, N/8]   packed along N in AWQ's order: value i of word [k, c] holds
                              q[8c + AWQ_ORDER[i], k]
    qzeros   int32 [G', N/8]  the zero points, packed the same way
    scales   fp16  [G', N]    AutoAWQ's min-max: scale = (max - min) / 15 (at least 1e-5),
                              z = clamp(-round(min / scale), 0, 15),
                              q = clamp(round(w / scale) + z, 0, 15)
"""

from collections.abc import Iterable, Sequence

import torch

from vllm_kunlun.model_zoo.gptq import (
    Grid,
    Quantized,
    gptq_quantize,
    round_to_nearest,
)

#: Group sizes tried, largest first: the first that divides every quantized input size.
GROUP_SIZES = (128, 64, 32)
PACK = 8  # 4-bit values per int32
MAX_Q = 15
#: AWQ's packing order: value i of a word holds element AWQ_ORDER[i] of 8 along N.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
GPTQ_SYM_ZERO = 8


def choose_group_size(input_sizes: dict[str, int], choices: Iterable[int] = GROUP_SIZES) -> int:
    """The largest of `choices` that divides every input size (name -> in_features)."""
    choices = tuple(choices)
    for size in choices:
        if all(k % size == 0 for k in input_sizes.values()):
            return size
    odd = sorted({k for k in input_sizes.values() if k % min(choices)})
    raise ValueError(
        f"no group size of {', '.join(map(str, choices))} divides every quantized layer's "
        f"input size (not divisible by {min(choices)}: {', '.join(map(str, odd))})"
    )


def pack_int4(values: torch.Tensor, dim: int, order: Sequence[int] = tuple(range(PACK))):
    """int32 words of the 4-bit `values` (integers in [0, 15]), eight consecutive values
    along `dim` per word: value i (bits 4i..4i+3) is element order[i] of the eight."""
    if values.shape[dim] % PACK:
        raise ValueError(f"dimension {dim} of {tuple(values.shape)} is not a multiple of 8")
    v = values.to(torch.int64).movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], -1, PACK)[..., list(order)]
    shifts = torch.arange(PACK, dtype=torch.int64) * 4
    words = (v << shifts).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement int32
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def act_order(energy: torch.Tensor) -> torch.Tensor:
    """The input channels by decreasing energy (ties in channel order), as GPTQ's
    desc_act orders them by the Hessian diagonal."""
    return torch.sort(energy.float(), descending=True, stable=True).indices


def gptq_qparams(group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's symmetric min-max of a group's weights [N, G]: scale 2 * absmax / 15 rounded
    to float16 (1 for an all-zero group), zero point 8; float32 [N] each."""
    absmax = group.abs().amax(dim=-1)
    absmax = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    scale = (2 * absmax / MAX_Q).to(torch.float16).float()
    return scale, torch.full_like(scale, GPTQ_SYM_ZERO)


def awq_qparams(group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoAWQ's asymmetric min-max of a group's weights [N, G]: scale (max - min) / 15 (at
    least 1e-5) rounded to float16, zero point clamp(-round(min / scale), 0, 15)."""
    low, high = group.amin(dim=-1), group.amax(dim=-1)
    scale = ((high - low).clamp(min=1e-5) / MAX_Q).to(torch.float16).float()
    return scale, torch.clamp(-torch.round(low / scale), 0, MAX_Q)


GPTQ_GRID = Grid(0, MAX_Q, gptq_qparams)
AWQ_GRID = Grid(0, MAX_Q, awq_qparams)


def _quantize(
    weight: torch.Tensor,
    group_size: int,
    grid: Grid,
    hessian: torch.Tensor | None,
    order: torch.Tensor | None = None,
) -> Quantized:
    if hessian is None:
        return round_to_nearest(weight, group_size, grid, order)
    return gptq_quantize(weight, hessian, group_size, grid, order)


def gptq_tensors(
    weight: torch.Tensor,
    group_size: int,
    order: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales and g_idx of a Linear weight [N, K] (symmetric 4-bit GPTQ),
    its input channels grouped along `order` (None: channel order): GPTQ with the inputs'
    Hessian [K, K], or round to nearest without one."""
    return pack_gptq(_quantize(weight, group_size, GPTQ_GRID, hessian, order))


def pack_gptq(quantized: Quantized) -> dict[str, torch.Tensor]:
    """The GPTQ v1 tensors of a symmetric GPTQ_GRID result."""
    n, _ = quantized.q.shape
    groups = quantized.scales.shape[1]
    zeros = torch.full((groups, n), GPTQ_SYM_ZERO - 1)
    return {
        "qweight": pack_int4(quantized.q.t(), dim=0),
        "qzeros": pack_int4(zeros, dim=1),
        "scales": quantized.scales.to(torch.float16).t().contiguous(),
        "g_idx": quantized.g_idx,
    }


def awq_tensors(
    weight: torch.Tensor, group_size: int, hessian: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """qweight, qzeros and scales of a Linear weight [N, K] (AutoAWQ GEMM, asymmetric
    4-bit): GPTQ with the inputs' Hessian [K, K], or round to nearest without one."""
    return pack_awq(_quantize(weight, group_size, AWQ_GRID, hessian))


def pack_awq(quantized: Quantized) -> dict[str, torch.Tensor]:
    """The AutoAWQ GEMM tensors of an AWQ_GRID result (contiguous groups)."""
    return {
        "qweight": pack_int4(quantized.q.t(), dim=1, order=AWQ_ORDER),
        "qzeros": pack_int4(quantized.zeros.t(), dim=1, order=AWQ_ORDER),
        "scales": quantized.scales.to(torch.float16).t().contiguous(),
    }


def gptq_config(group_size: int, desc_act: bool, quantizer: str, method: str = "gptq") -> dict:
    """config.json's quantization_config (and quantize_config.json) as GPTQModel writes it
    for a 4-bit symmetric GPTQ v1 checkpoint with an unquantized lm_head."""
    return {
        "bits": 4,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": True,
        "lm_head": False,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "damp_percent": 0.01,
        "static_groups": False,
        "true_sequential": True,
        "meta": {"quantizer": [quantizer], "method": method},
    }


def awq_config(group_size: int) -> dict:
    """config.json's quantization_config as AutoAWQ writes it (GEMM version)."""
    return {
        "quant_method": "awq",
        "zero_point": True,
        "group_size": group_size,
        "bits": 4,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
