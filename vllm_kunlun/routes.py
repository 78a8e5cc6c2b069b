"""The route report: which kernels each layer of a loaded model runs, and refusal at start-up.

After a worker loads the model, every module is classified by what its forward will run on this
platform, into exactly one route:

- **plugin op**: a plugin layer (vllm_kunlun.layers.OOT_LAYERS) dispatched to the plugin's ops,
  or a vLLM attention layer whose implementation is the plugin's `KunlunAttentionImpl`;
- **vLLM native**: plain torch that exists on any torch device, from an explicit list
  (`NATIVE_LAYERS`, each with its reason), vLLM custom ops that run their `forward_native`,
  torch.nn modules, and vLLM's model code between the layers;
- **refused**: anything else that does device work, e.g. a vLLM custom op whose chosen forward
  is its `forward_cpu` override (vLLM's CPU kernels, `torch.ops._C.*`, which do not exist on a
  Kunlun XPU), quantized linear methods without a plugin kernel, quantized MoE methods, MoE
  variants the plugin's MoE method cannot run, other attention backends.

Quantized linear layers are a plugin op when their kernel is the plugin's
(vllm_kunlun.quantization).

MoE blocks: vLLM's `MoERunner` is model code around the experts (its gate, shared experts and
routed experts are listed as layers of their own); its `RoutedExperts` are a plugin op when
their method is the plugin's (vllm_kunlun.layers.moe), and refused otherwise.

The report has one row per layer type and route (instances, a few module names, the detail).
`enforce_routes` logs it, writes it as JSON when VLLM_KUNLUN_ROUTE_REPORT names a directory,
and raises `RefusedLayersError` if any layer is refused. Layers inside a plugin layer or a
native layer (the `ApplyRotaryEmb` of a rotary layer, say) belong to it and are not listed.
"""

import ast
import functools
import importlib
import inspect
import json
import os
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from vllm_kunlun import envs
from vllm_kunlun.log import get_logger

logger = get_logger("routes")

PLUGIN_OP, NATIVE, REFUSED = "plugin op", "vLLM native", "refused"
ROUTES = (PLUGIN_OP, NATIVE, REFUSED)
#: Module names shown per row (the JSON keeps the same number).
SHOWN_MODULES = 3

GEMM_REASON = (
    "GEMM: vLLM's oneDNN CPU GEMM on the emulated XPU, torch's matmul on a Kunlun XPU; "
    "not a plugin op yet"
)
QUANTIZED_INSTEAD = "an unquantized checkpoint in bfloat16 or float16"
MOE_INSTEAD = (
    "an unquantized MoE checkpoint in bfloat16 or float16 (the plugin's MoE method runs "
    "unquantized experts only)"
)
MOE_RUNNER_REASON = (
    "vLLM's MoE runner: calls the gate, shared experts and routed experts listed here and sums "
    "(and all-reduces) their outputs in plain torch"
)
MLA_BLOCK_REASON = (
    "vLLM's MLA block: calls the projections, norms, rotary and MLA attention listed here, "
    "splits and reshapes in plain torch"
)
KERNEL_INSTEAD = "a model without this layer (the plugin needs a route for it first)"


@dataclass(frozen=True)
class Route:
    route: str
    detail: str
    instead: str = ""
    #: Model code: its submodules are layers of their own. Any other layer owns its submodules.
    descend: bool = False


@dataclass
class RouteRow:
    layer_type: str
    route: str
    detail: str
    instead: str = ""
    count: int = 0
    modules: list[str] = field(default_factory=list)


@dataclass
class RouteReport:
    rows: list[RouteRow]
    rank: int | None = None

    def refused(self) -> list[RouteRow]:
        return [row for row in self.rows if row.route == REFUSED]

    def route_of(self, layer_type: str) -> set[str]:
        return {row.route for row in self.rows if row.layer_type == layer_type}

    def to_json(self) -> dict:
        return {"rank": self.rank, "rows": [asdict(row) for row in self.rows]}

    @classmethod
    def from_json(cls, data: dict) -> "RouteReport":
        return cls([RouteRow(**row) for row in data["rows"]], data.get("rank"))


class RefusedLayersError(RuntimeError):
    """The model has layers that no plugin op and no torch-native path can run."""


# Classification ------------------------------------------------------------------------------


def _owner(cls: type, name: str) -> type | None:
    """The class in cls's MRO that defines attribute `name`."""
    return next((klass for klass in cls.__mro__ if name in vars(klass)), None)


_FORWARDS = (
    "forward_native",
    "forward_cpu",
    "forward_oot",
    "forward_cuda",
    "forward_xpu",
    "forward_hip",
    "forward_tpu",
)


def dispatched_forward(module: nn.Module) -> str | None:
    """Which forward_* CustomOp.dispatch_forward chose for this instance (None if unknown)."""
    chosen = getattr(module, "_forward_method", None)
    func = getattr(chosen, "__func__", chosen)
    func = getattr(func, "_torchdynamo_orig_callable", func)  # compiled forward_native
    func = getattr(func, "__func__", func)
    for name in _FORWARDS:
        if getattr(type(module), name, None) is func:
            return name
    return None


@functools.cache
def only_calls_forward_native(func: Callable) -> bool:
    """True if the function's body is `return self.forward_native(...)` (docstring aside)."""
    try:
        source = textwrap.dedent(inspect.getsource(func))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return False
    definition = tree.body[0]
    if not isinstance(definition, ast.FunctionDef):
        return False
    body = [
        statement
        for statement in definition.body
        if not (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant))
    ]
    if len(body) != 1 or not isinstance(body[0], ast.Return):
        return False
    call = body[0].value
    return (
        isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr == "forward_native"
        and isinstance(call.func.value, ast.Name)
        and call.func.value.id == "self"
    )


def _no_arm_lookup_table(module: nn.Module) -> bool:
    return getattr(module, "op", None) is None


def _not_powerpc(module: nn.Module) -> bool:
    from vllm.platforms import CpuArchEnum, current_platform

    return current_platform.get_cpu_architecture() != CpuArchEnum.POWERPC


#: vLLM custom ops whose forward_cpu override runs forward_native except on some hosts: class
#: name -> (condition for forward_native, on this instance; what the override does otherwise).
CONDITIONAL_NATIVE: dict[str, tuple[Callable[[nn.Module], bool], str]] = {
    "GELU": (_no_arm_lookup_table, "vLLM's bf16 lookup-table kernel on ARM hosts"),
    "GELUTanh": (_no_arm_lookup_table, "vLLM's gelu_tanh kernel on ARM hosts"),
    "NewGELU": (_not_powerpc, "vLLM's gelu_new kernel on POWER hosts"),
    "FastGELU": (_not_powerpc, "vLLM's gelu_fast kernel on POWER hosts"),
    "QuickGELU": (_not_powerpc, "vLLM's gelu_quick kernel on POWER hosts"),
}


def _custom_op_route(module: nn.Module) -> Route:
    """A vLLM CustomOp the plugin does not replace: native only if its chosen forward is plain
    torch (forward_native, or an override that only calls it)."""
    cls = type(module)
    chosen = dispatched_forward(module)
    if chosen is None:
        return Route(REFUSED, "cannot tell which forward vLLM dispatched to", KERNEL_INSTEAD)
    if chosen == "forward_native":
        return Route(
            NATIVE,
            f"vLLM custom op '{getattr(cls, 'name', cls.__name__)}' runs its "
            "forward_native (plain torch)",
        )
    owner = _owner(cls, chosen)
    from vllm.model_executor.custom_op import CustomOp

    if owner is CustomOp or only_calls_forward_native(vars(owner)[chosen]):
        return Route(NATIVE, f"{owner.__name__}.{chosen} only calls forward_native (plain torch)")
    if cls.__name__ in CONDITIONAL_NATIVE:
        condition, otherwise = CONDITIONAL_NATIVE[cls.__name__]
        if condition(module):
            return Route(
                NATIVE,
                f"{owner.__name__}.{chosen} runs forward_native (plain torch) "
                f"here; it would run {otherwise}",
            )
    return Route(
        REFUSED,
        f"vLLM's {owner.__name__}.{chosen}: vLLM's own kernel for this device (on the emulated "
        "XPU its CPU kernels, torch.ops._C.*, which do not exist on a Kunlun XPU), not a "
        "plugin op",
        KERNEL_INSTEAD,
    )


@functools.cache
def _plugin_classes() -> dict[type, str]:
    """Plugin layer class -> the vLLM class name it replaces."""
    from vllm_kunlun.layers import OOT_LAYERS

    return {layer_cls: name for name, layer_cls in OOT_LAYERS.items()}


def _plugin_layer_route(module: nn.Module, vllm_name: str) -> Route:
    cls = type(module)
    chosen = dispatched_forward(module)
    owner = _owner(cls, chosen) if chosen in ("forward_oot", "forward_cpu") else None
    if owner is not None and owner.__module__.startswith("vllm_kunlun."):
        if getattr(module, "variance_size_override", None) is not None:
            return Route(
                NATIVE,
                "RMSNorm over a prefix of the hidden size: vLLM's forward_native (plain torch); "
                "no plugin kernel for it",
            )
        ops = ", ".join(f"kunlun.{op}" for op in getattr(cls, "plugin_ops", ()))
        return Route(PLUGIN_OP, f"{cls.__name__} -> {ops}")
    if chosen == "forward_native":
        return Route(
            NATIVE,
            f"{cls.__name__} disabled by compilation_config.custom_ops "
            f"('-{vllm_name}'): vLLM's forward_native (plain torch)",
        )
    return Route(
        REFUSED,
        f"{cls.__name__} dispatched to {chosen}, not to the plugin's forward",
        KERNEL_INSTEAD,
    )


def _attention_route(module: nn.Module) -> Route:
    from vllm_kunlun.attention.backend import KunlunAttentionImpl

    impl = getattr(module, "impl", None)
    if isinstance(impl, KunlunAttentionImpl):
        attn_type = str(getattr(impl.attn_type, "value", impl.attn_type))
        if attn_type == "encoder_only":
            ops = "kunlun.encoder_attention"
        else:
            ops = "kunlun.reshape_and_cache, kunlun.decode_attention, kunlun.prefill_attention"
        return Route(PLUGIN_OP, f"KunlunAttentionImpl ({attn_type}) -> {ops}")
    return Route(
        REFUSED,
        f"attention implementation {type(impl).__name__}, not the plugin's KunlunAttentionImpl",
        "the plugin's attention backend (leave --attention-backend unset)",
    )


MLA_OPS = (
    "kunlun.concat_and_cache_mla, kunlun.mla_decode, kunlun.mla_prefill, "
    "kunlun.mla_gather_cache, kunlun.merge_attention_states"
)


def _mla_route(module: nn.Module) -> Route:
    from vllm_kunlun.attention.mla import KunlunMLAImpl

    impl = getattr(module, "impl", None)
    if isinstance(impl, KunlunMLAImpl):
        return Route(
            PLUGIN_OP,
            f"KunlunMLAImpl -> {MLA_OPS}; the absorbed up-projections (W_UK, W_UV) are "
            "batched GEMMs in vLLM's layer (torch.bmm)",
        )
    return Route(
        REFUSED,
        f"MLA implementation {type(impl).__name__}, not the plugin's KunlunMLAImpl",
        "the plugin's MLA backend (leave --attention-backend unset)",
    )


def _mla_wrapper_route(module: nn.Module) -> Route:
    """vLLM's MLA block: projections, norms and rotary (listed on their own) around the MLA
    attention layer, joined by splits and reshapes in plain torch."""
    if getattr(module, "fuse_qkv_rmsnorm", False):
        return Route(REFUSED, "MLA with vLLM's fused q/kv RMSNorm kernel", KERNEL_INSTEAD)
    if getattr(module, "indexer", None) is not None:
        return Route(
            REFUSED,
            "sparse MLA (DeepSeek-V3.2's top-k indexer)",
            "a dense MLA model (DeepSeek-V2/V3/R1)",
        )
    return Route(NATIVE, MLA_BLOCK_REASON, descend=True)


def _quant_method_name(module: nn.Module) -> str:
    return type(getattr(module, "quant_method", None)).__name__


def _kernel_calls_in_forward(cls: type) -> str | None:
    """The vLLM kernel namespace model code's own forward calls directly, if any."""
    forward = vars(cls).get("forward")
    if forward is None:
        return None
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return None
    module_globals = vars(sys.modules.get(cls.__module__, types.ModuleType("empty")))
    kernel_modules = [
        name
        for name, value in module_globals.items()
        if isinstance(value, types.ModuleType) and value.__name__ in ("vllm._custom_ops", "vllm._C")
    ]
    for name in ("torch.ops.", *(f"{name}." for name in kernel_modules)):
        if name in source:
            return name.rstrip(".")
    return None


@dataclass(frozen=True)
class NativeLayer:
    """An entry of the native allowlist: a vLLM layer class (dotted path, subclasses included),
    why its forward is plain torch, and the quantization method it needs, if any (with another
    one the layer is refused)."""

    class_path: str
    reason: str
    quant_method: str | None = None


#: The native allowlist: vLLM layers (not CustomOps) that run plain torch on any torch device.
NATIVE_LAYERS: tuple[NativeLayer, ...] = (
    NativeLayer(
        "vllm.model_executor.layers.linear.LinearBase", GEMM_REASON, "UnquantizedLinearMethod"
    ),
    NativeLayer(
        "vllm.model_executor.layers.vocab_parallel_embedding.VocabParallelEmbedding",
        "embedding lookup (F.embedding); as the LM head, the logits GEMM (as for linear layers)",
        "UnquantizedEmbeddingMethod",
    ),
    NativeLayer(
        "vllm.model_executor.layers.logits_processor.LogitsProcessor",
        "gathers, scales and soft-caps the logits in plain torch after the LM-head GEMM",
    ),
    NativeLayer(
        "vllm.model_executor.layers.pooler.Pooler",
        "pooling of hidden states (mean, CLS, last token, normalization) in plain torch",
    ),
)


@functools.cache
def _import_class(path: str) -> type | None:
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name, None)
    except ImportError:
        return None


def _native_route(module: nn.Module) -> Route | None:
    for entry in NATIVE_LAYERS:
        cls = _import_class(entry.class_path)
        if cls is None or not isinstance(module, cls):
            continue
        method = _quant_method_name(module)
        if entry.quant_method is None or method == entry.quant_method:
            detail = entry.reason if entry.quant_method is None else f"{method}: {entry.reason}"
            return Route(NATIVE, detail)
        quantized = _quantized_linear_route(module, method)
        if quantized is not None:
            return quantized
        return Route(
            REFUSED, f"quantized ({method}): no plugin quantized kernel yet", QUANTIZED_INSTEAD
        )
    return None


def _quantized_linear_route(module: nn.Module, method: str) -> Route | None:
    """A quantized linear layer whose kernel is the plugin's (vllm_kunlun.quantization)."""
    from vllm_kunlun.quantization import plugin_linear_kernel

    kernel = plugin_linear_kernel(module)
    if kernel is None:
        return None
    scheme = getattr(module, "scheme", None)
    via = f"{method}({type(scheme).__name__})" if scheme is not None else method
    ops = ", ".join(f"kunlun.{op}" for op in kernel.ops_used)
    return Route(PLUGIN_OP, f"{via} -> {type(kernel).__name__} -> {ops}")


def _routed_experts_route(module: nn.Module) -> Route:
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    from vllm_kunlun.layers.moe import KunlunMonolithicMoE

    cls, method = type(module), getattr(module, "quant_method", None)
    if cls.forward_monolithic is not RoutedExperts.forward_monolithic:
        return Route(
            REFUSED,
            f"{cls.__name__} overrides how vLLM runs the experts' method",
            KERNEL_INSTEAD,
        )
    if isinstance(method, KunlunMonolithicMoE):
        if method.refusal is not None:
            return Route(REFUSED, method.refusal.what, method.refusal.instead)
        ops = ", ".join(f"kunlun.{op}" for op in method.ops_used)
        return Route(PLUGIN_OP, f"{type(method).__name__} -> {ops}")
    name = type(method).__name__
    if name == "UnquantizedFusedMoEMethod":
        detail = "vLLM's UnquantizedFusedMoEMethod, not the plugin's (plugin layers not registered)"
    else:
        detail = f"quantized MoE ({name}): no plugin kernel for this MoE quantization"
    return Route(REFUSED, detail, MOE_INSTEAD)


def _moe_route(module: nn.Module) -> Route | None:
    """MoE: the runner is model code; its routed experts run the plugin's MoE method."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.model_executor.layers.fused_moe.runner.moe_runner_interface import (
        MoERunnerInterface,
    )
    from vllm.model_executor.layers.linear import LinearBase

    from vllm_kunlun.layers.moe import runner_refusal

    if isinstance(module, MoERunnerInterface):
        refusal = runner_refusal(module)
        if refusal is not None:
            return Route(REFUSED, refusal.what, refusal.instead, descend=True)
        return Route(NATIVE, MOE_RUNNER_REASON, descend=True)
    if isinstance(module, RoutedExperts):
        return _routed_experts_route(module)
    if not type(module).__module__.startswith("vllm.model_executor.layers.fused_moe"):
        return None
    if isinstance(module, LinearBase):  # the router's gate (GateLinear)
        return _native_route(module)
    return Route(REFUSED, f"MoE layer {type(module).__name__}: no plugin MoE op", KERNEL_INSTEAD)


def _refused_by_name(module: nn.Module) -> Route | None:
    from vllm_kunlun.layers.rotary import REFUSED_ROTARY

    cls = type(module)
    if cls.__name__ in REFUSED_ROTARY:
        reason, instead = REFUSED_ROTARY[cls.__name__]
        return Route(REFUSED, reason, instead)
    return None


def classify(module: nn.Module) -> Route | None:
    """The route of one module's own work; None for pure containers (ModuleList and the like)."""
    from vllm.model_executor.custom_op import CustomOp, PluggableLayer
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
    from vllm.model_executor.layers.fused_moe.runner.shared_experts import SharedExperts
    from vllm.model_executor.layers.mla import MultiHeadLatentAttentionWrapper

    cls = type(module)
    # Containers, and vLLM's wrapper that runs a MoE block's shared expert MLP.
    if isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.Sequential, SharedExperts)):
        return None
    plugin = _plugin_classes()
    if cls in plugin:
        return _plugin_layer_route(module, plugin[cls])
    moe = _moe_route(module)
    if moe is not None:
        return moe
    refused = _refused_by_name(module)
    if refused is not None:
        return refused
    if isinstance(module, MultiHeadLatentAttentionWrapper):
        return _mla_wrapper_route(module)
    if isinstance(module, AttentionLayerBase):
        from vllm.model_executor.layers.attention.attention import Attention
        from vllm.model_executor.layers.attention.mla_attention import MLAAttention

        if isinstance(module, Attention):
            return _attention_route(module)
        if isinstance(module, MLAAttention):
            return _mla_route(module)
        return Route(
            REFUSED,
            f"{cls.__name__}: attention / state-space layer without a plugin "
            "kernel (only standard attention is routed)",
            "a model with standard multi-head or grouped-query attention",
        )
    native = _native_route(module)
    if native is not None:
        return native
    if isinstance(module, CustomOp):
        return _custom_op_route(module)
    if cls.__module__.startswith("torch.nn."):
        return Route(NATIVE, f"torch.nn.{cls.__name__}: a torch op on any torch device")
    if cls.__module__.startswith("vllm.model_executor.models.") and not isinstance(
        module, PluggableLayer
    ):
        kernel = _kernel_calls_in_forward(cls)
        if kernel is not None:
            return Route(
                REFUSED,
                f"model code whose forward calls {kernel} directly",
                KERNEL_INSTEAD,
                descend=True,
            )
        return Route(
            NATIVE, "vLLM model code: plain torch between the layers listed here", descend=True
        )
    return Route(
        REFUSED,
        f"{cls.__module__}.{cls.__name__}: a layer the plugin has no route for",
        KERNEL_INSTEAD,
    )


# The report ----------------------------------------------------------------------------------


def _layer_type(module: nn.Module) -> str:
    """vLLM's class name for plugin layers (what the model asked for), else the class name."""
    return _plugin_classes().get(type(module), type(module).__name__)


def _is_moe_runner(module: nn.Module) -> bool:
    from vllm.model_executor.layers.fused_moe.runner.moe_runner_interface import (
        MoERunnerInterface,
    )

    return isinstance(module, MoERunnerInterface)


def _outside_moe_runners(model: nn.Module) -> set[int]:
    """Ids of the modules reachable without entering an MoE runner."""
    found: set[int] = set()
    stack = [model]
    while stack:
        module = stack.pop()
        if id(module) not in found:
            found.add(id(module))
            if not _is_moe_runner(module):
                stack.extend(module.children())
    return found


def _walk(
    module: nn.Module, prefix: str, listed_outside: set[int], in_runner: bool = False
) -> Iterator[tuple[str, nn.Module, Route]]:
    """The modules with a route, depth first. Inside an MoE runner, the modules the model also
    holds outside it (the MoE block's gate and shared experts) are listed there only."""
    if in_runner and id(module) in listed_outside:
        return
    route = classify(module)
    if route is not None:
        yield prefix, module, route
        if not route.descend:
            return  # the layer owns its submodules' work
    in_runner = in_runner or _is_moe_runner(module)
    for name, child in module.named_children():
        yield from _walk(child, f"{prefix}.{name}" if prefix else name, listed_outside, in_runner)


def route_report(model: nn.Module, rank: int | None = None) -> RouteReport:
    rows: dict[tuple[str, str, str], RouteRow] = {}
    for name, module, route in _walk(model, "", _outside_moe_runners(model)):
        key = (_layer_type(module), route.route, route.detail)
        row = rows.get(key)
        if row is None:
            row = rows[key] = RouteRow(key[0], route.route, route.detail, route.instead)
        row.count += 1
        if len(row.modules) < SHOWN_MODULES:
            row.modules.append(name or "(model)")
    order = {route: i for i, route in enumerate(ROUTES)}
    ordered = sorted(rows.values(), key=lambda row: (order[row.route], row.layer_type))
    return RouteReport(ordered, rank)


def render(report: RouteReport) -> str:
    """The report as a text table: layer type, instances, route, detail."""
    header = ("layer type", "count", "route", "detail")
    lines = [(row.layer_type, str(row.count), row.route, row.detail) for row in report.rows]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(3)]

    def fmt(line: tuple[str, ...]) -> str:
        return "  ".join(
            [line[0].ljust(widths[0]), line[1].rjust(widths[1]), line[2].ljust(widths[2]), line[3]]
        )

    return "\n".join([fmt(header), *(fmt(line) for line in lines)])


def refusal_message(report: RouteReport) -> str:
    parts = []
    for row in report.refused():
        shown = ", ".join(row.modules) + (", ..." if row.count > len(row.modules) else "")
        parts.append(
            f"- {row.layer_type} ({row.count}x, e.g. {shown}): {row.detail}. "
            f"Use instead: {row.instead or KERNEL_INSTEAD}."
        )
    return (
        "vllm-kunlun does not run this model: these layers have no plugin op, and vLLM's own "
        "kernels for them do not exist on a Kunlun XPU (no silent fallback; "
        "docs/architecture.md, 'Routes'):\n" + "\n".join(parts)
    )


def report_file_name(rank: int | None) -> str:
    return f"routes-rank{rank if rank is not None else 0}-{os.getpid()}.json"


def write_report(report: RouteReport, directory: str | os.PathLike[str]) -> Path:
    path = Path(directory) / report_file_name(report.rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report.to_json(), indent=1))
    tmp.replace(path)
    return path


def read_reports(directory: str | os.PathLike[str]) -> list[RouteReport]:
    """Every routes-*.json in `directory`, ordered by rank."""
    reports = [
        RouteReport.from_json(json.loads(path.read_text()))
        for path in Path(directory).glob("routes-*.json")
    ]
    return sorted(reports, key=lambda report: report.rank or 0)


def enforce_routes(model: nn.Module, rank: int | None = None) -> RouteReport:
    """Build the report of a loaded model, log it (rank 0 at INFO), write it if asked, and
    raise RefusedLayersError if a layer is refused."""
    report = route_report(model, rank)
    log = logger.info if not rank else logger.debug
    log("Layer routes of the model (rank %s):\n%s", rank or 0, render(report))
    directory = envs.VLLM_KUNLUN_ROUTE_REPORT.get()
    if directory:
        write_report(report, directory)
    if report.refused():
        raise RefusedLayersError(refusal_message(report))
    return report
