"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): per-layer weight quantization with second-order error
compensation, written here from the paper's algorithm.

For a Linear with weight W [N, K] (out, in) and inputs x (K wide), GPTQ minimizes the layer
output error sum_x ||W x - Q x||^2 = tr((W - Q) H (W - Q)^T) / 2 with the Hessian
H = 2/n sum_x x x^T. It quantizes one input column at a time and spreads each column's
rounding error over the columns not yet quantized, weighted by the inverse Hessian:

    H += percdamp * mean(diag H) * I          (dead inputs, diag 0: H[i, i] = 1, W[:, i] = 0)
    U  = upper Cholesky factor of H^-1        (U^T U = H^-1)
    for each column i:  q_i = quantize(w_i);  e_i = (w_i - dequantize(q_i)) / U[i, i]
                        w_j -= e_i * U[i, j]  for every later column j

The updates are applied lazily in blocks of BLOCK_SIZE columns: inside a block column by
column, then the whole block's errors at once to the later columns. A group's scale (and
zero point) is computed when its first column comes up, from the group's current (error-
updated) weights; the block size is a multiple of the group size, so a group never straddles
two blocks. With an input-channel order (act-order) the columns are permuted first (GPTQ
orders them by decreasing diag(H)) and the groups are consecutive columns of that order.

The Hessians come from forward pre-hooks on the float model, all layers in one pass over the
calibration text (calibration.CALIBRATION_TEXT): non-sequential GPTQ, each layer's inputs
are the float model's, not those of a model whose earlier layers are already quantized.
With H = I the updates vanish (U is diagonal) and GPTQ is round-to-nearest.

GPTQ is opt-in (quantized.make_quantized_checkpoint(..., gptq=True), `vllm-kunlun quantize
--gptq`); the 4-bit schemes round to nearest by default. With the built-in calibration text
(about 1,800 tokens) the Hessians of wide layers are poorly estimated: on the default model
(layers with 1,536 inputs) GPTQ raised perplexity above round to nearest (w4a16-asym: +30%
over the float model against RTN's +15.4%; gptq: +50%).
"""

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

#: Columns per lazy-update block (rounded up to a multiple of the group size).
BLOCK_SIZE = 128
#: Dampening: this fraction of the mean Hessian diagonal is added to the diagonal.
PERCDAMP = 0.01

#: A group's scale and zero point (each [N], float32) from its current weights [N, G].
QParams = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Grid:
    """A group quantizer: integers in [qmin, qmax], w ~ (q - zero) * scale, the scale and
    zero point of a group computed by `qparams` (rounded as the format stores them)."""

    qmin: int
    qmax: int
    qparams: QParams

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        """The integers (as floats) of `w`; scale and zero broadcast against it."""
        return torch.clamp(torch.round(w / scale) + zero, self.qmin, self.qmax)


@dataclass
class Quantized:
    """GPTQ's result for a weight [N, K]: integers q [N, K] (float32, in the original column
    order), scales and zeros [N, K / G] per group, g_idx [K] (each column's group)."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """(q - zero) * scale [N, K], float32."""
        index = self.g_idx.long()
        return (self.q - self.zeros[:, index]) * self.scales[:, index]


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one thread: the column loop's operations are small, and with several
    threads their synchronization costs far more than the work (tens of times on a busy
    machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _inverse_cholesky(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of the dampened H^-1 (float64); H must have no zero diagonal."""
    h = hessian.double().clone()
    damp = percdamp * float(torch.diagonal(h).mean())
    h.diagonal().add_(damp)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True)


def _quantize_block(
    w: torch.Tensor, u: torch.Tensor, grid: Grid, group_size: int, first_group: int,
    scales: torch.Tensor, zeros: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Quantize the block's columns w [N, B] in place of their integers, column by column
    with GPTQ's updates (u: the block's [B, B] part of the Cholesky factor), filling the
    groups' scales and zeros; returns (integers [N, B], scaled errors [N, B])."""
    q = torch.empty_like(w)
    errors = torch.empty_like(w)
    for j in range(w.shape[1]):
        if j % group_size == 0:
            group = first_group + j // group_size
            scales[:, group], zeros[:, group] = grid.qparams(w[:, j : j + group_size])
            scale, zero = scales[:, group], zeros[:, group]
        q[:, j] = grid.quantize(w[:, j], scale, zero)
        error = (w[:, j] - (q[:, j] - zero) * scale) / u[j, j]
        w[:, j + 1 :] -= error[:, None] * u[j, j + 1 :][None, :]
        errors[:, j] = error
    return q, errors


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    grid: Grid,
    order: torch.Tensor | None = None,
    percdamp: float = PERCDAMP,
) -> Quantized:
    """GPTQ of a Linear weight [N, K] with the Hessian [K, K] of its inputs, in groups of
    `group_size` consecutive columns of `order` (None: the channel order)."""
    if weight.shape[1] % group_size:
        raise ValueError(
            f"input size {weight.shape[1]} is not a multiple of the group size {group_size}"
        )
    with _one_thread():
        return _gptq(weight, hessian, group_size, grid, order, percdamp)


def _gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    grid: Grid,
    order: torch.Tensor | None,
    percdamp: float,
) -> Quantized:
    n, k = weight.shape
    order = torch.arange(k) if order is None else order.long()
    w = weight.detach().float()[:, order].clone()
    h = hessian.detach().double()[order][:, order].clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    u = _inverse_cholesky(h, percdamp).float()

    block_size = -(-BLOCK_SIZE // group_size) * group_size
    scales = torch.zeros(n, k // group_size)
    zeros = torch.zeros(n, k // group_size)
    q = torch.empty(n, k)
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        q[:, start:end], errors = _quantize_block(
            w[:, start:end], u[start:end, start:end], grid, group_size, start // group_size,
            scales, zeros,
        )  # fmt: skip
        w[:, end:] -= errors @ u[start:end, end:]

    return Quantized(_unpermute(q, order), scales, zeros, group_index(order, group_size))


def group_index(order: torch.Tensor, group_size: int) -> torch.Tensor:
    """g_idx: the group of each input channel when channels are quantized in `order`."""
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel())
    return (position // group_size).to(torch.int32)


def round_to_nearest(
    weight: torch.Tensor, group_size: int, grid: Grid, order: torch.Tensor | None = None
) -> Quantized:
    """Plain round-to-nearest with the grid's scales (GPTQ with H = I, without the loop)."""
    n, k = weight.shape
    order = torch.arange(k) if order is None else order.long()
    w = weight.detach().float()[:, order]
    groups = w.reshape(n, k // group_size, group_size)
    params = [grid.qparams(groups[:, g]) for g in range(k // group_size)]
    scales = torch.stack([scale for scale, _ in params], dim=1)
    zeros = torch.stack([zero for _, zero in params], dim=1)
    q = grid.quantize(groups, scales[..., None], zeros[..., None]).reshape(n, k)
    return Quantized(_unpermute(q, order), scales, zeros, group_index(order, group_size))


def _unpermute(q: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Columns [N, K] quantized in `order` back in the channel order."""
    unpermuted = torch.empty_like(q)
    unpermuted[:, order] = q
    return unpermuted


class HessianCollector:
    """Forward pre-hooks accumulating H = 2/n sum x x^T (float32) of the named Linears'
    inputs; use as a context manager around the calibration forward passes."""

    def __init__(self, model: torch.nn.Module, names: Iterable[str]):
        self._names = set(names)
        self._model = model
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._handles: list = []

    def _hook(self, name: str):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if name not in self._sums:
                self._sums[name] = torch.zeros(x.shape[1], x.shape[1])
                self._counts[name] = 0
            self._sums[name].addmm_(x.t(), x)
            self._counts[name] += x.shape[0]

        return hook

    def __enter__(self) -> "HessianCollector":
        for name, module in self._model.named_modules():
            if name in self._names:
                self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def hessians(self) -> dict[str, torch.Tensor]:
        """{name: H [K, K]} of every Linear the calibration inputs reached."""
        return {name: s * (2 / self._counts[name]) for name, s in self._sums.items()}


def collect_hessians(
    model: torch.nn.Module, chunks: Iterable[list[int]], names: Iterable[str]
) -> dict[str, torch.Tensor]:
    """The Hessians of the named Linears' inputs over the token chunks, in one pass of the
    float model: {name: H} for every Linear the chunks reached."""
    with HessianCollector(model, names) as collector, torch.no_grad():
        for chunk in chunks:
            model(torch.tensor([chunk]), use_cache=False)
    return collector.hessians()
