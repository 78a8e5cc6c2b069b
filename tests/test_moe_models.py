"""MoE models end to end through the plugin's MoE method (vllm_kunlun.layers.moe).

One engine per tiny MoE model (vllm_kunlun.model_zoo.tiny), all prompts in one generate, as in
tests/test_models.py: greedy float32 output equals transformers token for token, top-5 logprobs
agree with vLLM's in-tree CPU backend, and op accounting shows the plugin's routing op and
experts op ran once per step per MoE layer (as often, per layer, as attention) and the other
routing op never. A model whose MoE variant the plugin cannot run is refused at start-up
naming what is unsupported. Expert parallelism: tests/test_expert_parallel.py.
"""

import pytest

from tests.engine import PROMPTS, emulation_env, hf_greedy, read_op_stats, run_generation
from tests.route_checks import assert_only_plugin_ops_and_listed_native_layers, route_env
from tests.test_models import (
    MAX_TOKENS,
    TOP,
    assert_same_tokens,
    check_model,
)
from vllm_kunlun import routes

pytestmark = pytest.mark.engine

ATTENTION_OPS = ("prefill_attention", "decode_attention", "reshape_and_cache", "rms_norm",
                 "fused_add_rms_norm", "rotary_embedding")  # fmt: skip
ROUTING_OPS = ("moe_softmax_topk", "moe_grouped_topk")


def moe_ops(routing_op: str, dense_mlp: bool) -> tuple[str, ...]:
    """The plugin ops a model must run: attention and norms, its routing op and the experts op,
    and silu_and_mul where it has a dense MLP (a dense layer or a shared expert)."""
    return ATTENTION_OPS + (routing_op, "moe_experts") + (("silu_and_mul",) if dense_mlp else ())


def assert_moe_ops_ran_per_step(counts: dict[str, int], routing_op: str, layers: int,
                                moe_layers: int) -> None:  # fmt: skip
    """Every forward pass runs attention once per layer and the MoE ops once per MoE layer."""
    steps = counts["reshape_and_cache"] // layers
    assert counts["reshape_and_cache"] == steps * layers, counts
    assert counts["moe_experts"] == counts[routing_op] == steps * moe_layers, counts
    (other,) = set(ROUTING_OPS) - {routing_op}
    assert counts.get(other, 0) == 0, counts


def test_qwen3_moe_matches_transformers(tiny_model_factory, tmp_path):
    """Softmax top-3 of 6 experts (neither a power of two), renormalized (norm_topk_prob)."""
    counts = check_model(tiny_model_factory("qwen3-moe"), tmp_path,
                         plugin_ops=moe_ops("moe_softmax_topk", dense_mlp=False))  # fmt: skip
    assert_moe_ops_ran_per_step(counts, "moe_softmax_topk", layers=2, moe_layers=2)


def test_qwen3_moe_without_renormalization_matches_transformers(tiny_model_factory, tmp_path):
    """norm_topk_prob off; 48 experts, top-3: a decode step of 8 sequences picks at most 24,
    so every decode step leaves experts without a token."""
    counts = check_model(tiny_model_factory("qwen3-moe-unnormed"), tmp_path,
                         plugin_ops=moe_ops("moe_softmax_topk", dense_mlp=False))  # fmt: skip
    assert_moe_ops_ran_per_step(counts, "moe_softmax_topk", layers=2, moe_layers=2)


def test_mixtral_matches_transformers(tiny_model_factory, tmp_path):
    """Top-2 of 4 experts, w1/w2/w3 expert weights."""
    counts = check_model(tiny_model_factory("mixtral"), tmp_path,
                         plugin_ops=moe_ops("moe_softmax_topk", dense_mlp=False))  # fmt: skip
    assert_moe_ops_ran_per_step(counts, "moe_softmax_topk", layers=2, moe_layers=2)


def test_qwen2_moe_with_a_gated_shared_expert_matches_transformers(tiny_model_factory, tmp_path):
    """Top-2 of 5 experts, not renormalized, plus a shared expert scaled by a sigmoid gate."""
    counts = check_model(tiny_model_factory("qwen2-moe"), tmp_path,
                         plugin_ops=moe_ops("moe_softmax_topk", dense_mlp=True))  # fmt: skip
    assert_moe_ops_ran_per_step(counts, "moe_softmax_topk", layers=2, moe_layers=2)


def test_glm4_moe_grouped_sigmoid_routing_matches_transformers(tiny_model_factory, tmp_path):
    """GLM-4.5: sigmoid scores, experts chosen with a (random, non-zero) correction bias in the
    best 2 of 4 groups, weights renormalized and scaled by 2.5; a shared expert; layer 0 dense."""
    counts = check_model(tiny_model_factory("glm4-moe"), tmp_path,
                         plugin_ops=moe_ops("moe_grouped_topk", dense_mlp=True))  # fmt: skip
    assert_moe_ops_ran_per_step(counts, "moe_grouped_topk", layers=3, moe_layers=2)


#: Why the in-tree comparison is skipped for ERNIE-4.5 MoE.
ERNIE_IN_TREE = (
    "vLLM 0.32's in-tree CPU router (CPURouter) ignores the correction bias of ungrouped "
    "routing and picks the top-3 by softmax alone, so its logprobs are not ERNIE-4.5's"
)


def test_ernie45_moe_biased_routing_matches_transformers(tiny_model_factory, tmp_path):
    """ERNIE-4.5: softmax top-3 of 6 experts chosen with a random correction bias, routed by
    the plugin's grouped op with one group; a shared expert; layer 0 dense. Compared with
    transformers only: ERNIE_IN_TREE says why not with vLLM's in-tree backend."""
    model = tiny_model_factory("ernie-moe")
    stats_dir = tmp_path / "ops"
    env = emulation_env(stats_dir, **route_env(tmp_path))
    result = run_generation(model, PROMPTS, MAX_TOKENS, env=env, logprobs=TOP, in_process=True)
    assert result["platform"] == "EmulatedKunlunPlatform"
    assert_same_tokens(result["token_ids"], hf_greedy(model, PROMPTS, MAX_TOKENS))
    counts = read_op_stats(stats_dir)
    missing = [op for op in moe_ops("moe_grouped_topk", dense_mlp=True) if not counts.get(op)]
    assert not missing, f"plugin ops that never ran: {missing}; counts: {counts}"
    assert_only_plugin_ops_and_listed_native_layers(tmp_path, result["log"], counts, moe=True)
    assert_moe_ops_ran_per_step(counts, "moe_grouped_topk", layers=3, moe_layers=2)


def refused_rows(report_dir) -> list[routes.RouteRow]:
    """The refused rows of every rank's route report (written before the refusal is raised)."""
    reports = routes.read_reports(report_dir)
    assert reports, f"no route report in {report_dir}"
    return [row for report in reports for row in report.refused()]


def test_custom_routing_function_is_refused_at_start_up_naming_it(tiny_model_factory, tmp_path):
    """PhiMoE routes with Sparsemixer, a custom routing function no plugin op implements: the
    route report refuses its experts before the first step, and says what to use instead."""
    report_dir = tmp_path / "routes"
    with pytest.raises(AssertionError, match="generation failed"):
        run_generation(tiny_model_factory("phimoe"), PROMPTS[:1], 2,
                       env=emulation_env(VLLM_KUNLUN_ROUTE_REPORT=str(report_dir)))  # fmt: skip
    (row,) = refused_rows(report_dir)
    assert row.layer_type == "KunlunRoutedExperts" and row.count == 2
    assert row.detail == "a custom MoE routing function (phimoe_routing_function)"
    assert "Qwen3-MoE" in row.instead and "docs/support-matrix.md" in row.instead


def test_moe_in_compile_mode_matches_transformers(tiny_model_factory, tmp_path):
    """vLLM's default torch.compile path: on the emulated XPU vLLM traces the MoE runner, and
    so the plugin's method, whose ops enter the graph through their fake kernels (GLM-4.5:
    grouped routing with a bias tensor, shared expert, dense layer)."""
    model = tiny_model_factory("glm4-moe")
    stats_dir = tmp_path / "ops"
    result = run_generation(model, PROMPTS[:4], 16, env=emulation_env(stats_dir),
                            enforce_eager=False)  # fmt: skip
    assert result["token_ids"] == hf_greedy(model, PROMPTS[:4], 16)
    counts = read_op_stats(stats_dir)
    assert counts.get("moe_grouped_topk", 0) > 0 and counts.get("moe_experts", 0) > 0, counts
