"""Routes, not hopes: every layer of a loaded model runs a plugin op, a listed torch-native path,
or the model is refused at start-up (vllm_kunlun.routes), and every vLLM rotary class the plugin
routes computes what vLLM's own torch-native forward computes.

- the classifier on small hand-built modules, under the emulated XPU's dispatch (forward_cpu)
  and a real XPU's (forward_oot);
- each routed rotary class against vLLM's forward_native of the same class (float32 exactly,
  bfloat16 within rounding), M-RoPE on [3, T] positions in each of its channel layouts;
- every tiny model's route report, written as JSON by the engine run of its model test
  (tests/route_checks.py; the benchmark's overhead model runs here).
"""

import importlib
import json
import pkgutil
import types

import pytest
import torch
from torch import nn
from vllm.config import CompilationConfig, VllmConfig, set_current_vllm_config
from vllm.model_executor import custom_op
from vllm.model_executor.custom_op import CustomOp
from vllm.model_executor.layers import rotary_embedding as vllm_rotary
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding, RotaryEmbeddingBase

from tests.engine import PROMPTS, REPO, emulation_env, read_op_stats, run_generation
from tests.route_checks import assert_only_plugin_ops_and_listed_native_layers, route_env
from vllm_kunlun import routes
from vllm_kunlun.layers import OOT_LAYERS, register_layers
from vllm_kunlun.layers.norm import KunlunRMSNorm
from vllm_kunlun.layers.rotary import REFUSED_ROTARY, ROUTED_BY_CACHE
from vllm_kunlun.model_zoo.tiny import ARCHITECTURES, MLA_ARCHITECTURES, MOE_ARCHITECTURES
from vllm_kunlun.ops import stats
from vllm_kunlun.routes import NATIVE, PLUGIN_OP, REFUSED


def config(custom_ops: str = "all") -> VllmConfig:
    """A vLLM config whose custom ops are all on (eager) or all off (as under inductor)."""
    return VllmConfig(compilation_config=CompilationConfig(custom_ops=[custom_ops]))


@pytest.fixture
def custom_ops_on():
    with set_current_vllm_config(config("all")):
        yield


@pytest.fixture
def on_kunlun_xpu(monkeypatch):
    """CustomOp dispatch as on the real Kunlun platform: out of tree, not a CPU."""
    xpu = types.SimpleNamespace(
        is_rocm=lambda: False,
        is_cpu=lambda: False,
        is_tpu=lambda: False,
        is_xpu=lambda: False,
        is_out_of_tree=lambda: True,
    )
    monkeypatch.setattr(custom_op, "current_platform", xpu)


# Hand-built layers ---------------------------------------------------------------------------


class CpuKernelOp(CustomOp):
    """Like many vLLM ops: a torch-native forward, and a forward_cpu that calls vLLM's C++."""

    name = "test_cpu_kernel_op"

    def forward_native(self, x):
        return x * 2

    def forward_cpu(self, x):
        return torch.ops._C.test_kernel(x)


class DelegatingOp(CustomOp):
    name = "test_delegating_op"

    def forward_native(self, x):
        return x + 1

    def forward_cpu(self, x):
        # Only the torch-native forward, as vLLM's ApplyRotaryEmb and MRotaryEmbedding do.
        return self.forward_native(x)


class NativeOnlyOp(CustomOp):
    name = "test_native_only_op"

    def forward_native(self, x):
        return x - 1


class UnknownLayer(nn.Module):
    def forward(self, x):
        return x


def test_a_plugin_layer_is_routed_to_its_plugin_ops(custom_ops_on):
    route = routes.classify(KunlunRMSNorm(64))
    assert route.route == PLUGIN_OP
    assert "kunlun.rms_norm" in route.detail and "kunlun.fused_add_rms_norm" in route.detail


def test_a_disabled_plugin_layer_is_reported_as_torch_native():
    with set_current_vllm_config(config("none")):
        route = routes.classify(KunlunRMSNorm(64))
    assert route.route == NATIVE and "disabled by compilation_config.custom_ops" in route.detail


def test_a_vllm_custom_op_running_its_cpu_kernel_is_refused(custom_ops_on):
    route = routes.classify(CpuKernelOp())
    assert route.route == REFUSED
    assert "CpuKernelOp.forward_cpu" in route.detail and "torch.ops._C" in route.detail


@pytest.mark.parametrize("op", [DelegatingOp, NativeOnlyOp])
def test_a_custom_op_whose_forward_is_plain_torch_is_native(custom_ops_on, op):
    route = routes.classify(op())
    assert route.route == NATIVE and "forward_native" in route.detail


def test_a_disabled_vllm_custom_op_runs_forward_native_and_is_native():
    with set_current_vllm_config(config("none")):
        route = routes.classify(CpuKernelOp())
    assert route.route == NATIVE and "runs its forward_native" in route.detail


def test_on_a_kunlun_xpu_dispatch_goes_to_forward_oot(on_kunlun_xpu, custom_ops_on):
    """No CPU kernels there: vLLM's default forward_oot is forward_native; plugin layers stay
    plugin layers."""
    assert routes.dispatched_forward(CpuKernelOp()) == "forward_oot"
    assert routes.classify(CpuKernelOp()).route == NATIVE
    assert routes.classify(KunlunRMSNorm(64)).route == PLUGIN_OP


def test_torch_modules_containers_and_unknown_layers():
    assert routes.classify(nn.LayerNorm(8)).route == NATIVE
    assert routes.classify(nn.ModuleList([nn.Tanh()])) is None
    route = routes.classify(UnknownLayer())
    assert route.route == REFUSED and "no route" in route.detail


def test_linear_layers_are_native_only_unquantized():
    from vllm.model_executor.layers.linear import ReplicatedLinear, UnquantizedLinearMethod

    layer = nn.Module.__new__(ReplicatedLinear)  # the classifier reads the type and method
    nn.Module.__init__(layer)
    with set_current_vllm_config(config()):
        layer.quant_method = UnquantizedLinearMethod()
    route = routes.classify(layer)
    assert route.route == NATIVE and "GEMM" in route.detail
    layer.quant_method = types.new_class("Fp8LinearMethod")()
    route = routes.classify(layer)
    assert route.route == REFUSED and "Fp8LinearMethod" in route.detail
    assert "unquantized checkpoint" in route.instead


def test_refused_rotary_classes_name_why_and_what_instead():
    """Phi-3's LongRoPE is a plain nn.Module (no CustomOp seam); FoPE mixes learned
    coefficients. The classifier reads only the class, so the layers are left unbuilt."""
    for cls, says, instead in [
        (vllm_rotary.Phi3LongRoPEScaledRotaryEmbedding, "not a CustomOp", "Phi-3-mini-4k"),
        (vllm_rotary.FourierRotaryEmbedding, "Fourier RoPE", "standard rotary"),
    ]:
        layer = nn.Module.__new__(cls)
        nn.Module.__init__(layer)
        route = routes.classify(layer)
        assert route.route == REFUSED and says in route.detail and instead in route.instead


def test_moe_experts_run_the_plugin_method_and_the_runner_is_model_code():
    """vLLM's MoE runner, built as models build it: the runner is model code around its
    gate and experts; the experts are the plugin's MoE method, naming the ops this layer
    calls; a variant the method cannot run and a quantized method are refused."""
    from tests.test_moe_layer import build_moe, plugin_layers_registered

    with plugin_layers_registered():
        plain = build_moe(6, 3, renormalize=True)
        grouped = build_moe(
            8,
            3,
            use_grouped_topk=True,
            num_expert_group=4,
            topk_group=2,
            scoring_func="sigmoid",
            e_score_correction_bias=torch.zeros(8),
        )
        biased = build_moe(6, 3, has_bias=True)  # GPT-OSS style expert biases
    runner_route = routes.classify(plain)
    assert runner_route.route == NATIVE and runner_route.descend
    assert runner_route.detail == routes.MOE_RUNNER_REASON
    route = routes.classify(plain.routed_experts)
    assert route.route == PLUGIN_OP
    assert route.detail == (
        "KunlunUnquantizedFusedMoEMethod -> kunlun.moe_softmax_topk, kunlun.moe_experts"
    )
    assert (
        "kunlun.moe_grouped_topk, kunlun.moe_experts"
        in routes.classify(grouped.routed_experts).detail
    )
    route = routes.classify(biased.routed_experts)
    assert route.route == REFUSED and "biases" in route.detail and "Qwen3-MoE" in route.instead

    plain.routed_experts.quant_method = types.new_class("Fp8MoEMethod", (nn.Module,))()
    route = routes.classify(plain.routed_experts)
    assert route.route == REFUSED and "quantized MoE (Fp8MoEMethod)" in route.detail
    assert "unquantized MoE checkpoint" in route.instead


def test_an_moe_block_reports_its_gate_and_experts_once(custom_ops_on):
    """The gate is a child of the model's MoE block and of vLLM's runner: one layer, one row."""
    from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from tests.test_moe_layer import build_moe, plugin_layers_registered

    gate = nn.Module.__new__(GateLinear)  # the classifier reads the type and method
    nn.Module.__init__(gate)
    gate.quant_method = UnquantizedLinearMethod()
    with plugin_layers_registered():
        block = nn.ModuleDict({"gate": gate, "experts": build_moe(6, 3, gate=gate)})
    report = routes.route_report(block)
    rows = {row.layer_type: row for row in report.rows}
    assert rows["GateLinear"].count == 1 and rows["GateLinear"].modules == ["gate"]
    assert rows["GateLinear"].route == NATIVE and "GEMM" in rows["GateLinear"].detail
    assert rows["MoERunner"].route == NATIVE
    assert rows["RoutedExperts"].route == PLUGIN_OP
    assert rows["RoutedExperts"].modules == ["experts.routed_experts"]


class TinyModel(nn.Module):
    """Model code (a torch.nn tree) with a plugin layer, native layers and a refused one."""

    def __init__(self):
        super().__init__()
        self.norm = KunlunRMSNorm(16)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.LayerNorm(16), CpuKernelOp()) for _ in range(5)]
        )


def test_report_rows_json_and_refusal(custom_ops_on, monkeypatch, tmp_path):
    monkeypatch.setattr(routes, "classify", _as_model_code(routes.classify))
    report = routes.route_report(TinyModel(), rank=0)
    rows = {row.layer_type: row for row in report.rows}
    assert rows["RMSNorm"].route == PLUGIN_OP and rows["RMSNorm"].modules == ["norm"]
    assert rows["LayerNorm"].route == NATIVE and rows["LayerNorm"].count == 5
    refused = rows["CpuKernelOp"]
    assert refused.route == REFUSED and refused.count == 5
    assert refused.modules == ["blocks.0.1", "blocks.1.1", "blocks.2.1"]
    assert "CpuKernelOp" in routes.render(report)

    monkeypatch.setenv("VLLM_KUNLUN_ROUTE_REPORT", str(tmp_path))
    with pytest.raises(routes.RefusedLayersError) as refusal:
        routes.enforce_routes(TinyModel(), rank=0)
    message = str(refusal.value)
    assert "CpuKernelOp (5x, e.g. blocks.0.1, blocks.1.1, blocks.2.1, ...)" in message
    assert "Use instead:" in message
    (written,) = routes.read_reports(tmp_path)
    assert written.rank == 0 and written.route_of("CpuKernelOp") == {REFUSED}
    assert json.loads(next(tmp_path.glob("routes-rank0-*.json")).read_text())["rows"]


def _as_model_code(classify):
    """TinyModel is defined in a test, not in vLLM's models package: treat it as model code."""

    def wrapped(module):
        if isinstance(module, TinyModel):
            return routes.Route(NATIVE, "vLLM model code (test)", descend=True)
        return classify(module)

    return wrapped


# Rotary classes ------------------------------------------------------------------------------

HEAD, ROT, MAX_POS, BASE = 64, 64, 1024, 10000.0
T, HEADS, KV_HEADS = 11, 4, 2

#: (vLLM class name, case, extra constructor args, kwargs, is_neox_style, rotary_dim); the
#: extra args follow (head_size, rotary_dim, max_position, base, is_neox_style) as `build` says.
#: Several cases per class where its options change the math.
ROTARY_CASES = [
    ("RotaryEmbedding", "neox", (), {}, True, ROT),
    ("RotaryEmbedding", "gptj-partial", (), {}, False, 32),
    ("Llama3RotaryEmbedding", "", (8.0, 1.0, 4.0, 256), {}, True, ROT),
    ("YaRNScalingRotaryEmbedding", "", (4.0,), {}, True, ROT),
    (
        "YaRNScalingRotaryEmbedding",
        "mscale",
        (4.0,),
        {"mscale": 0.7, "mscale_all_dim": 1.0},
        False,
        32,
    ),
    ("LinearScalingRotaryEmbedding", "", ([1.0, 2.0],), {}, True, ROT),
    ("NTKScalingRotaryEmbedding", "", (2.0,), {}, True, ROT),
    ("NTKScalingRotaryEmbedding", "mixed_b", (2.0,), {"mixed_b": 0.5}, True, ROT),
    ("DynamicNTKScalingRotaryEmbedding", "", (), {}, True, ROT),
    ("DynamicNTKAlphaRotaryEmbedding", "", (3.0,), {}, True, ROT),
    ("Gemma4RotaryEmbedding", "partial", (), {}, True, 32),
]


def build(
    name: str, args: tuple, kwargs: dict, neox: bool, rotary_dim: int, dtype: torch.dtype
) -> CustomOp:
    """The plugin class registered for vLLM's `name`, built as vLLM's own would be."""
    if name == "DynamicNTKScalingRotaryEmbedding":  # max_trained_positions sits in the middle
        return OOT_LAYERS[name](HEAD, rotary_dim, MAX_POS, MAX_POS // 2, BASE, neox, 2.0, dtype)
    if name == "Llama3RotaryEmbedding":
        return OOT_LAYERS[name](HEAD, rotary_dim, MAX_POS, BASE, neox, dtype, *args)
    if name in ("RotaryEmbedding", "Gemma4RotaryEmbedding"):
        return OOT_LAYERS[name](HEAD, rotary_dim, MAX_POS, BASE, neox, dtype)
    return OOT_LAYERS[name](HEAD, rotary_dim, MAX_POS, BASE, neox, *args, dtype, **kwargs)


def qkv_views(dtype: torch.dtype, tokens: int = T) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k as the views of a fused qkv projection that models pass to the rotary layer."""
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD, dtype=dtype) * 2
    return qkv[:, : HEADS * HEAD], qkv[:, HEADS * HEAD : (HEADS + KV_HEADS) * HEAD]


def check_same(plugin: tuple, native: tuple, dtype: torch.dtype) -> None:
    """float32: the same up to summation order; bfloat16: within a few roundings (the plugin
    rotates in float32 and rounds once, vLLM's torch-native forward rounds every product)."""
    if dtype == torch.float32:
        tolerance = {"atol": 1e-5, "rtol": 1e-5}
    else:
        tolerance = {"atol": 0.05, "rtol": 0.02}
    for got, want in zip(plugin, native, strict=True):
        torch.testing.assert_close(got.float(), want.float(), **tolerance)


def compare_with_native(
    layer: CustomOp, positions: torch.Tensor, dtype: torch.dtype, native=None, **extra
) -> None:
    """The layer as the emulated XPU dispatches it (the plugin's forward_cpu, rotating in
    place through the plugin's op) against vLLM's forward_native (out of place)."""
    assert routes.classify(layer).route == PLUGIN_OP
    query, key = qkv_views(dtype, positions.shape[-1])
    native = native or type(layer).forward_native
    want = native(layer, positions, query.clone(), key.clone(), **extra)
    calls = stats.snapshot().get("rotary_embedding", 0)
    got = layer(positions, query, key, **extra)
    assert stats.snapshot().get("rotary_embedding", 0) > calls
    check_same(got, want, dtype)
    assert got[0].data_ptr() == query.data_ptr()  # rotated in place, like vLLM's kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("name", "case", "args", "kwargs", "neox", "rotary_dim"),
    ROTARY_CASES,
    ids=[f"{c[0]}-{c[1]}" if c[1] else c[0] for c in ROTARY_CASES],
)
def test_cache_routed_rotary_equals_vllm_forward_native(
    custom_ops_on, name, case, args, kwargs, neox, rotary_dim, dtype
):
    torch.manual_seed(0)
    layer = build(name, args, kwargs, neox, rotary_dim, dtype)
    assert type(layer).__mro__[1].__name__ == name  # vLLM's class, with the plugin's forward
    positions = torch.randint(0, layer.cos_sin_cache.shape[0], (T,))
    compare_with_native(layer, positions, dtype)


def vllm_rotary_classes() -> set[type]:
    """Every *RotaryEmbedding module class in vLLM's rotary_embedding package."""
    found = set()
    for info in pkgutil.iter_modules(vllm_rotary.__path__):
        module = importlib.import_module(f"{vllm_rotary.__name__}.{info.name}")
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, nn.Module)
                and value.__module__ == module.__name__
                and value.__name__.endswith("RotaryEmbedding")
            ):
                found.add(value)
    return found


def test_every_vllm_rotary_class_is_routed_or_refused():
    """A new rotary class in vLLM must get a route or a refusal here, not fall through."""
    routed, refused = set(OOT_LAYERS), set(REFUSED_ROTARY)
    rotary_classes = vllm_rotary_classes()
    assert len(rotary_classes) >= 17
    for cls in rotary_classes:
        assert (cls.__name__ in routed) != (cls.__name__ in refused), cls.__name__
    # Generated plugin classes only suit classes that keep RotaryEmbedding's forward.
    for cls in ROUTED_BY_CACHE:
        assert issubclass(cls, RotaryEmbedding)
        overridden = [
            m
            for m in ("forward", "forward_native", "forward_cpu", "forward_oot")
            if getattr(cls, m) is not getattr(RotaryEmbedding, m)
        ]
        assert not overridden, (cls.__name__, overridden)
    assert all(
        issubclass(OOT_LAYERS[name], RotaryEmbeddingBase) for name in routed if "Rotary" in name
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_deepseek_scaling_rotary_equals_vllm_forward_native(custom_ops_on, dtype):
    """MLA's shapes: q_pe [T, H, rope_dim], k_pe [T, 1, rope_dim], a per-token offset."""
    torch.manual_seed(0)
    layer = OOT_LAYERS["DeepseekScalingRotaryEmbedding"](
        64, 64, 512, BASE, False, 4.0, dtype, mscale=0.707, mscale_all_dim=0.707
    )
    positions = torch.randint(0, 1024, (T,))
    offsets = torch.randint(0, 512, (T,))
    query = torch.randn(T, HEADS, 64, dtype=dtype)
    key = torch.randn(T, 1, 64, dtype=dtype)
    assert routes.classify(layer).route == PLUGIN_OP
    want = layer.forward_native(positions, query.clone(), key.clone(), offsets)
    got = layer(positions, query, key.clone(), offsets)
    check_same(got, want, dtype)
    # Non-contiguous views (slices of a wider head) are rotated as copies.
    wide = torch.randn(T, HEADS, 96, dtype=dtype)
    want = layer.forward_native(positions, wide[..., 32:].clone(), key.clone())
    got = layer(positions, wide[..., 32:], key.clone())
    check_same(got, want, dtype)


#: M-RoPE layouts: (vLLM class name, constructor kwargs, rotary_dim): Qwen2-VL sections,
#: Qwen3-VL interleaving, M-RoPE with YaRN, Ernie 4.5-VL, Bailing, openPangu interleaving.
MROPE_CASES = {
    "qwen2-vl": ("MRotaryEmbedding", {"mrope_section": [8, 12, 12]}, ROT, True),
    "qwen3-vl-interleaved": (
        "MRotaryEmbedding",
        {"mrope_section": [12, 10, 10], "mrope_interleaved": True},
        ROT,
        True,
    ),
    "gptj-partial": ("MRotaryEmbedding", {"mrope_section": [4, 6, 6]}, 32, False),
    "yarn": ("MRotaryEmbedding", {"mrope_section": [8, 12, 12], "scaling_factor": 4.0}, ROT, True),
    "ernie-4.5-vl": ("Ernie4_5_VLRotaryEmbedding", {"mrope_section": [10, 10, 12]}, ROT, True),
    "bailing": ("BailingMRotaryEmbedding", {"mrope_section": [12, 10, 10]}, ROT, False),
    "openpangu": (
        "MRotaryEmbeddingInterleaved",
        {"mrope_section": [12, 10, 10], "mrope_interleaved": True},
        ROT,
        True,
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(MROPE_CASES))
def test_mrope_equals_vllm_forward_native_on_three_row_positions(custom_ops_on, case, dtype):
    """[3, T] positions whose t, h and w rows differ, as for image and video tokens."""
    torch.manual_seed(0)
    name, kwargs, rotary_dim, neox = MROPE_CASES[case]
    layer = OOT_LAYERS[name](HEAD, rotary_dim, MAX_POS // 4, BASE, neox, dtype, **kwargs)
    vllm_cls = next(cls for cls in type(layer).__mro__ if cls.__name__ == name)
    assert vllm_cls.__module__.startswith("vllm.model_executor.layers.rotary_embedding")
    # vLLM's own torch-native forward; openPangu's is its `forward` override.
    native = vllm_cls.forward if name == "MRotaryEmbeddingInterleaved" else vllm_cls.forward_native
    positions = torch.randint(0, layer.cos_sin_cache.shape[0], (3, T))
    compare_with_native(layer, positions, dtype, native=native)
    if name != "MRotaryEmbeddingInterleaved":  # openPangu takes [k, T] positions only
        compare_with_native(layer, positions[0], dtype, native=native)  # text-only: 1-D


def test_get_rope_builds_the_plugin_class_for_each_rope_type(custom_ops_on):
    """What a model asks vLLM for becomes the plugin's layer once the plugin is registered."""
    saved = dict(custom_op.op_registry_oot)
    register_layers()
    try:
        cases = {
            "default": {},
            "llama3": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
            "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
            "mrope": {"rope_type": "default", "mrope_section": [8, 12, 12]},
            "linear": {"rope_type": "linear", "factor": 2.0},
            "dynamic": {"rope_type": "dynamic", "factor": 2.0},
        }
        for i, (rope_type, parameters) in enumerate(cases.items()):
            layer = vllm_rotary.get_rope(
                HEAD, 3000 + i, rope_parameters=parameters, dtype=torch.float32
            )
            assert type(layer).__module__ == "vllm_kunlun.layers.rotary", rope_type
            assert routes.classify(layer).route == PLUGIN_OP, rope_type
    finally:
        custom_op.op_registry_oot.clear()
        custom_op.op_registry_oot.update(saved)


# Engines ---------------------------------------------------------------------------------------

#: Where each tiny model's engine run checks its route report (route_checks), so that a new tiny
#: model cannot go unchecked. The overhead model (a benchmark model) is checked here.
ROUTE_CHECKED_BY = {
    **dict.fromkeys(["llama", "qwen2", "qwen3", "phi3", "gemma2", "mistral", "llama3",
                     "qwen3-yarn"], "tests/test_models.py"),
    **dict.fromkeys(MOE_ARCHITECTURES, "tests/test_moe_models.py"),
    **dict.fromkeys(MLA_ARCHITECTURES, "tests/test_mla_models.py"),
    "overhead": "tests/test_routes.py",
}  # fmt: skip


def test_every_tiny_model_has_its_routes_checked_by_an_engine_test():
    assert set(ROUTE_CHECKED_BY) == set(ARCHITECTURES)
    for arch, test_file in ROUTE_CHECKED_BY.items():
        if test_file != "tests/test_routes.py":
            assert f'"{arch}"' in (REPO / test_file).read_text(), (arch, test_file)


@pytest.mark.engine
def test_the_overhead_model_runs_only_plugin_ops_and_listed_native_layers(
    tiny_model_factory, tmp_path
):
    env = emulation_env(tmp_path / "ops", **route_env(tmp_path))
    result = run_generation(tiny_model_factory("overhead"), PROMPTS, 2, env=env)
    assert all(len(ids) == 2 for ids in result["token_ids"])
    assert_only_plugin_ops_and_listed_native_layers(
        tmp_path, result["log"], read_op_stats(tmp_path / "ops")
    )
