"""The route-report checks every model test applies to its engine run (tests/test_models.py,
tests/test_moe_models.py, tests/test_routes.py): with VLLM_KUNLUN_ROUTE_REPORT set, the run
leaves its report, and nothing in it may be refused or native beyond the listed reasons."""

from pathlib import Path

from vllm_kunlun import routes
from vllm_kunlun.routes import NATIVE, PLUGIN_OP

#: What native rows may say: the native allowlist (linear, embedding, logits), vLLM's model code,
#: torch.nn modules and vLLM custom ops running forward_native.
ALLOWED_NATIVE = tuple(
    f"{method}: {entry.reason}" if method else entry.reason
    for entry in routes.NATIVE_LAYERS
    for method in [entry.quant_method]
) + (
    "vLLM model code",
    "torch.nn.",
    "vLLM custom op",
    routes.MOE_RUNNER_REASON,
    routes.MLA_BLOCK_REASON,
)


def route_env(tmp_path: Path) -> dict[str, str]:
    """The environment entry that makes an engine run write its route report."""
    return {"VLLM_KUNLUN_ROUTE_REPORT": str(tmp_path / "routes")}


def assert_only_plugin_ops_and_listed_native_layers(
    tmp_path: Path, log: str, counts: dict[str, int], *, moe: bool = False,
    rotary_class: str | None = None, attention: str = "Attention",
) -> None:  # fmt: skip
    """The run's route report (written under route_env(tmp_path)): attention (the `attention`
    layer type: MLAAttention for MLA models) and rotary are plugin ops (and `rotary_class` is,
    if given), nothing is refused, native rows name an allowed reason; an MoE model's experts
    are the plugin's MoE method."""
    (report,) = routes.read_reports(tmp_path / "routes")
    assert "Layer routes of the model (rank 0)" in log
    assert not report.refused()
    for row in report.rows:
        assert row.route in (PLUGIN_OP, NATIVE), row
        if row.route == NATIVE:
            assert row.detail.startswith(ALLOWED_NATIVE), row
    plugin = {row.layer_type for row in report.rows if row.route == PLUGIN_OP}
    assert {attention} < plugin
    assert any("RotaryEmbedding" in name for name in plugin), plugin
    if rotary_class is not None:
        assert report.route_of(rotary_class) == {PLUGIN_OP}
    assert counts.get("rotary_embedding", 0) > 0
    if moe:
        assert report.route_of("KunlunRoutedExperts") == {PLUGIN_OP}
        assert report.route_of("MoERunner") == {NATIVE}
        assert counts.get("moe_experts", 0) > 0
