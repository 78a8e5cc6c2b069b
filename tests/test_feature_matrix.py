"""Engine features through the plugin, each compared with a run without the feature or with
vLLM's in-tree CPU backend (tiny Llama, float32, greedy or seeded, so token ids must be equal).

Three engines, each started once (tests/features_probe.py runs every probe on one engine):
- "on":     the plugin with prefix caching and chunked prefill (64-token step budget);
- "off":    the plugin without either, and a KV cache too small for the batch (preemption);
- "intree": vLLM's own CPU backend (no plugin), for sampling and long-context behaviour.
"""

import json
import math
import os
import subprocess
import sys

import jsonschema
import pytest

from tests.engine import REPO, emulation_env, read_op_stats

pytestmark = pytest.mark.engine

#: float32 on both sides; the stacks differ only in the attention kernels' summation order.
LOGPROB_TOLERANCE = 1e-4

ALL_PROBES = ["prefix_cache", "long_prompt", "batch", "sampling", "structured_output",
              "long_context"]  # fmt: skip


def run_probes(model, probes: list[str], env: dict, **engine_kwargs) -> dict:
    spec = {"model": str(model), "probes": probes, "engine_kwargs": engine_kwargs}
    child_env = {**os.environ, **{k: v for k, v in env.items() if v is not None}}
    for key in [k for k, v in env.items() if v is None]:
        child_env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "tests.features_probe", json.dumps(spec)],
                          cwd=REPO, env=child_env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-6000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.fixture(scope="module")
def engines(tiny_model_factory, tmp_path_factory) -> dict[str, dict]:
    model = tiny_model_factory("llama")
    stats = tmp_path_factory.mktemp("feature-ops")
    # A random-weight model pads JSON with whitespace forever unless the grammar forbids it.
    compact_json = {"backend": "xgrammar", "disable_any_whitespace": True}
    on = run_probes(model, ALL_PROBES, emulation_env(stats), enable_prefix_caching=True,
                    max_num_batched_tokens=64, block_size=16,
                    structured_outputs_config=compact_json)  # fmt: skip
    off = run_probes(
        model, ["prefix_cache", "long_prompt", "batch"], emulation_env(),
        enable_prefix_caching=False, enable_chunked_prefill=False, max_model_len=320,
        max_num_batched_tokens=320, block_size=16, num_gpu_blocks_override=22, max_num_seqs=8,
    )  # fmt: skip
    intree = run_probes(model, ["sampling", "long_context"], {"VLLM_KUNLUN_EMULATE": None},
                        gpu_memory_utilization=0.3)  # fmt: skip
    assert (on["platform"], off["platform"]) == ("EmulatedKunlunPlatform", "EmulatedKunlunPlatform")
    assert intree["platform"] == "CpuPlatform"
    assert read_op_stats(stats).get("prefill_attention", 0) > 0
    return {"on": on, "off": off, "intree": intree}


def test_prefix_caching_hits_and_gives_the_same_tokens_as_caching_off(engines):
    on, off = engines["on"]["prefix_cache"], engines["off"]["prefix_cache"]
    assert on["prompt_tokens"] >= 210  # a 200-token shared prefix and a short tail
    assert on["hits"] > 0, f"no prefix-cache hits: {on}"
    assert off["hits"] == 0
    assert on["token_ids"] == off["token_ids"]


def test_chunked_prefill_gives_the_same_tokens_as_one_prefill(engines):
    on, off = engines["on"]["long_prompt"], engines["off"]["long_prompt"]
    assert on["prompt_tokens"] > 64, "the prompt must exceed the 64-token step budget"
    assert on["token_ids"] == off["token_ids"]


def test_preemption_completes_every_request_with_unconstrained_tokens(engines):
    constrained, unconstrained = engines["off"]["batch"], engines["on"]["batch"]
    assert constrained["preemptions"] > 0, "the 22-block KV cache should force preemption"
    assert unconstrained["preemptions"] == 0
    assert all(len(ids) == 48 for ids in constrained["token_ids"])
    assert constrained["token_ids"] == unconstrained["token_ids"]


def completions(result: dict, case: str) -> list[dict]:
    return result["sampling"][case]["completions"]


@pytest.mark.parametrize(
    "case",
    ["seeded", "n3", "top_k", "top_p", "min_p", "penalties", "stop_string", "stop_token",
     "max_tokens", "logprobs"],
)  # fmt: skip
def test_sampling_matches_the_in_tree_backend(engines, case):
    plugin, intree = completions(engines["on"], case), completions(engines["intree"], case)
    assert plugin == intree


def test_sampling_parameters_take_effect(engines):
    result = engines["on"]["sampling"]
    assert completions(engines["on"], "seeded") == completions(engines["on"], "seeded_again")
    assert len(completions(engines["on"], "n3")) == 3
    assert len({tuple(c["token_ids"]) for c in completions(engines["on"], "n3")}) > 1
    [stopped] = completions(engines["on"], "stop_string")
    assert stopped["finish_reason"] == "stop" and stopped["stop_reason"] == result["stop_word"]
    assert result["stop_word"] not in stopped["text"]
    [stop_token] = completions(engines["on"], "stop_token")
    assert stop_token["finish_reason"] == "stop"
    assert stop_token["stop_reason"] == result["greedy"][4]
    [short] = completions(engines["on"], "max_tokens")
    assert len(short["token_ids"]) == 5 and short["finish_reason"] == "length"


@pytest.mark.parametrize(("kind", "top"), [("logprobs", 5), ("prompt_logprobs", 3)])
def test_logprobs_match_the_in_tree_backend(engines, kind, top):
    plugin = engines["on"]["sampling"]["logprobs"][kind]
    intree = engines["intree"]["sampling"]["logprobs"][kind]
    assert len(plugin) == len(intree) > 0
    for position, (ours, theirs) in enumerate(zip(plugin, intree, strict=True)):
        assert len(ours) >= top
        for token in set(ours) & set(theirs):
            assert math.isclose(ours[token], theirs[token], abs_tol=LOGPROB_TOLERANCE), (
                f"{kind} position {position} token {token}: {ours[token]} vs {theirs[token]}"
            )
        best = sorted(ours, key=ours.get, reverse=True)[:top]
        assert set(best) <= set(theirs), f"{kind} position {position}: top-{top} differ"


def test_structured_output_returns_json_that_validates(engines):
    result = engines["on"]["structured_output"]
    jsonschema.validate(json.loads(result["text"]), result["schema"])


def test_long_context_near_the_limit_works_and_past_it_is_refused_like_in_tree(engines):
    ours, theirs = engines["on"]["long_context"], engines["intree"]["long_context"]
    assert ours["near_limit_tokens"] == 4
    assert ours["refusal"] and "maximum context length" in ours["refusal"]
    assert ours["refusal"] == theirs["refusal"]
