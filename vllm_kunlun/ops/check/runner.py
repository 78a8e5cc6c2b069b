"""Running check-kernels cases: a provider's kernel on a device vs the reference on the host.

For each case and dtype, the case's arguments are built on the device; the oracle gets the same
values widened to float64 on the host and runs the family's reference kernel. The outputs (the
returned tensors, or the arguments the op mutates) are compared as
max |got - want| <= atol + rtol * max |want| over the floating outputs, and as
max |got - want| <= the case's integer_tolerance (default 0: equal) over the integer ones (ids,
quantized values). One call is watched for host syncs; further calls give the median time; on
a device with graphs, one capture is tried.
"""

import importlib
import statistics
import time
import zlib
from dataclasses import asdict, dataclass

import torch

from vllm_kunlun.ops.check.case import Case
from vllm_kunlun.ops.check.syncs import HostSyncCounter
from vllm_kunlun.ops.declare import OpSpec
from vllm_kunlun.ops.provider import Provider, declared_ops, families

PASS, FAIL, ERROR, UNSUPPORTED = "pass", "FAIL", "error", "unsupported"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Result:
    op: str
    case: str
    dtype: str
    status: str
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    atol: float | None = None
    rtol: float | None = None
    median_ms: float | None = None
    host_syncs: int | None = None
    graph_capturable: str = "n/a"
    kernel: str = ""
    message: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def cases_by_op() -> dict[str, list[Case]]:
    """Every family's `cases.py` CASES, by op; ops without cases map to []."""
    found: dict[str, list[Case]] = {name: [] for name in declared_ops()}
    for family in families():
        module = importlib.import_module(f"vllm_kunlun.ops.{family}.cases")
        for op, cases in module.CASES.items():
            found[op] = list(cases)
    return found


def _oracle(arg):
    if isinstance(arg, torch.Tensor):
        target = torch.float64 if arg.is_floating_point() else arg.dtype
        return arg.detach().to(device="cpu", dtype=target, copy=True)
    return arg


def _outputs(spec: OpSpec, args: tuple, returned) -> list[torch.Tensor]:
    if isinstance(returned, (tuple, list)):  # e.g. routing's (weights, ids)
        return list(returned)
    if returned is not None:
        return [returned]
    names = list(spec.signature.parameters)
    mutated = (args[names.index(name)] for name in spec.mutates_args)
    return [t for t in mutated if t is not None]  # an optional output may be absent


@dataclass
class _Errors:
    floating: float = 0.0  # max |got - want| over the floating outputs
    scale: float = 0.0  # max |want| over the floating outputs
    integer: float = 0.0  # max |got - want| over the integer outputs
    integer_scale: float = 0.0  # max |want| over the integer outputs


def _errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> _Errors:
    """Floating and integer outputs apart: an integer output (ids, quantized values) is judged
    on its own, not against a tolerance scaled by its magnitude."""
    errors = _Errors()
    for g, w in zip(got, want, strict=True):
        if g.shape != w.shape:
            raise AssertionError(f"output shape {tuple(g.shape)}, expected {tuple(w.shape)}")
        want64 = w.to(torch.float64)
        diff = (g.detach().to("cpu", torch.float64) - want64).abs()
        error = float(diff.max()) if diff.numel() else 0.0
        scale = float(want64.abs().max()) if w.numel() else 0.0
        if w.is_floating_point():
            errors.floating, errors.scale = max(errors.floating, error), max(errors.scale, scale)
        else:
            errors.integer = max(errors.integer, error)
            errors.integer_scale = max(errors.integer_scale, scale)
    return errors


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(kernel, args: tuple, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        kernel(*args)
        _synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _graph_capturable(kernel, args: tuple, device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a"
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            kernel(*args)  # warm-up on a side stream, as capture requires
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            kernel(*args)
        graph.replay()
        _synchronize(device)
        return "yes"
    except Exception as error:  # capture failures come in many types
        return f"no ({type(error).__name__})"


def run_case(spec: OpSpec, case: Case, dtype_name: str, provider: Provider,
             device: torch.device, repeats: int) -> Result:  # fmt: skip
    dtype = DTYPES[dtype_name]
    atol, rtol = case.tolerance_for(dtype)
    result = Result(spec.name, case.name, dtype_name, ERROR, atol=atol, rtol=rtol,
                    kernel=provider.sources[spec.name])  # fmt: skip
    seed = zlib.crc32(f"{spec.name}/{case.name}/{dtype_name}".encode())
    try:
        args = case.make(dtype, device, torch.Generator().manual_seed(seed))
        oracle_args = tuple(_oracle(a) for a in args)
        reference = importlib.import_module(f"vllm_kunlun.ops.{spec.family}.reference")
        want = _outputs(spec, oracle_args, getattr(reference, spec.name)(*oracle_args))
        kernel = provider.kernel(spec.name)
        with HostSyncCounter() as syncs:
            returned = kernel(*args)
        _synchronize(device)
        result.host_syncs = syncs.total
        errors = _errors(_outputs(spec, args, returned), want)
        error = max(errors.floating, errors.integer)
        scale = max(errors.scale, errors.integer_scale)
        result.max_abs_error = error
        result.max_rel_error = error / scale if scale else error
        floating_ok = errors.floating <= atol + rtol * errors.scale
        integer_ok = errors.integer <= case.integer_tolerance
        result.status = PASS if floating_ok and integer_ok else FAIL
        if not floating_ok:
            result.message = f"error {errors.floating:.3g} > {atol} + {rtol} x {errors.scale:.3g}"
        if not integer_ok:
            result.message = (f"{result.message}; " if result.message else "") + (
                f"integer outputs differ by {errors.integer:g} > {case.integer_tolerance}"
            )
        result.median_ms = _median_ms(kernel, args, device, repeats)
        result.graph_capturable = _graph_capturable(kernel, args, device)
    except NotImplementedError as error:
        result.status, result.message = UNSUPPORTED, str(error).splitlines()[0]
    except Exception as error:  # report every failure per case; the run goes on
        result.status, result.message = ERROR, f"{type(error).__name__}: {error}"[:300]
    return result
