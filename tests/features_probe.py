"""Run engine-feature probes on ONE vLLM engine in a fresh process; print the results as JSON.

Used by tests/test_feature_matrix.py, which starts this once per engine configuration (plugin
with features on, plugin with features off and a tiny KV cache, vLLM's in-tree CPU backend) and
compares the answers. Usage: python -m tests.features_probe SPEC_JSON with
{"model", "engine_kwargs", "probes": [names]}; every probe is greedy or seeded, float32.
"""

import json
import sys

from tests.generate import finish

# 78 words: over 200 tokens with the default model's tokenizer, which the tiny models share.
SHARED_PREFIX_WORDS = 78
JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["yes", "no"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["answer", "count"],
    "additionalProperties": False,
}


def shared_prefix_prompts() -> list[str]:
    prefix = " ".join(f"w{i % 50}" for i in range(SHARED_PREFIX_WORDS))
    return [f"{prefix} question {tail}:" for tail in ("one", "two", "three", "four")]


def long_prompt() -> str:
    return " ".join(f"token{i % 97}" for i in range(70))


def batch_prompts() -> list[str]:
    return [f"Request number {i} asks about the number {i * 7}" for i in range(8)]


def _completion(output) -> dict:
    first = output.outputs[0]
    return {"token_ids": list(first.token_ids), "text": first.text,
            "finish_reason": first.finish_reason, "stop_reason": first.stop_reason}  # fmt: skip


def _top_logprobs(positions) -> list[dict[str, float]]:
    return [{str(token): lp.logprob for token, lp in position.items()} for position in positions]


def _metrics(llm) -> dict[str, float]:
    totals: dict[str, float] = {}
    for metric in llm.get_metrics():
        value = getattr(metric, "value", None)
        if isinstance(value, (int, float)):
            totals[metric.name] = totals.get(metric.name, 0.0) + value
    return totals


def probe_prefix_cache(llm, sp) -> dict:
    prompts = shared_prefix_prompts()
    greedy = sp(temperature=0, max_tokens=12, ignore_eos=True)
    outputs = [llm.generate([prompt], greedy, use_tqdm=False)[0] for prompt in prompts]
    metrics = _metrics(llm)
    return {
        "prompt_tokens": len(outputs[0].prompt_token_ids),
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "hits": metrics.get("vllm:prefix_cache_hits", 0.0),
        "queries": metrics.get("vllm:prefix_cache_queries", 0.0),
    }


def probe_long_prompt(llm, sp) -> dict:
    [output] = llm.generate([long_prompt()], sp(temperature=0, max_tokens=12, ignore_eos=True),
                            use_tqdm=False)  # fmt: skip
    return {"prompt_tokens": len(output.prompt_token_ids), **_completion(output)}


def probe_batch(llm, sp) -> dict:
    params = sp(temperature=0, max_tokens=48, ignore_eos=True)
    outputs = llm.generate(batch_prompts(), params, use_tqdm=False)
    return {"token_ids": [list(o.outputs[0].token_ids) for o in outputs],
            "preemptions": _metrics(llm).get("vllm:num_preemptions", 0.0)}  # fmt: skip


def probe_sampling(llm, sp) -> dict:
    prompt = "The three primary colors are"
    greedy = llm.generate([prompt], sp(temperature=0, max_tokens=16), use_tqdm=False)[0]
    greedy_ids = list(greedy.outputs[0].token_ids)
    words = greedy.outputs[0].text.split()
    stop_word = words[2] if len(words) > 2 else words[-1]
    cases = {
        "seeded": sp(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True),
        "seeded_again": sp(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True),
        "n3": sp(n=3, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True),
        "top_k": sp(temperature=1.0, top_k=3, seed=5, max_tokens=16, ignore_eos=True),
        "top_p": sp(temperature=1.0, top_p=0.5, seed=5, max_tokens=16, ignore_eos=True),
        "min_p": sp(temperature=1.0, min_p=0.2, seed=5, max_tokens=16, ignore_eos=True),
        "penalties": sp(
            temperature=0,
            presence_penalty=1.5,
            frequency_penalty=1.0,
            repetition_penalty=1.5,
            max_tokens=16,
            ignore_eos=True,
        ),  # fmt: skip
        "stop_string": sp(temperature=0, max_tokens=16, stop=[stop_word]),
        "stop_token": sp(temperature=0, max_tokens=16, stop_token_ids=[greedy_ids[4]]),
        "max_tokens": sp(temperature=0, max_tokens=5, ignore_eos=True),
        "logprobs": sp(
            temperature=0, max_tokens=8, logprobs=5, prompt_logprobs=3, ignore_eos=True
        ),  # fmt: skip
    }
    results: dict = {"greedy": greedy_ids, "stop_word": stop_word}
    for name, params in cases.items():
        [output] = llm.generate([prompt], params, use_tqdm=False)
        results[name] = {
            "completions": [
                {
                    "token_ids": list(c.token_ids),
                    "text": c.text,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }  # fmt: skip
                for c in output.outputs
            ]
        }
        if params.logprobs:
            results[name]["logprobs"] = _top_logprobs(output.outputs[0].logprobs)
        if params.prompt_logprobs:
            results[name]["prompt_logprobs"] = _top_logprobs(output.prompt_logprobs[1:])
    return results


def probe_structured_output(llm, sp) -> dict:
    from vllm.sampling_params import StructuredOutputsParams

    schema = StructuredOutputsParams(json=JSON_SCHEMA, disable_any_whitespace=True)
    params = sp(temperature=0, max_tokens=64, structured_outputs=schema)
    [output] = llm.generate(["Answer in JSON:"], params, use_tqdm=False)
    return {"schema": JSON_SCHEMA, **_completion(output)}


def probe_long_context(llm, sp) -> dict:
    limit = llm.llm_engine.vllm_config.model_config.max_model_len
    params = sp(temperature=0, max_tokens=4, ignore_eos=True)
    near = {"prompt_token_ids": [100 + i % 500 for i in range(limit - 4)]}
    [output] = llm.generate([near], params, use_tqdm=False)
    past = {"prompt_token_ids": [100 + i % 500 for i in range(limit + 10)]}
    try:
        llm.generate([past], params, use_tqdm=False)
        refusal = None
    except Exception as error:  # vLLM's validation error; its type and text are compared
        refusal = f"{type(error).__name__}: {error}"
    return {"near_limit_tokens": len(output.outputs[0].token_ids), "refusal": refusal,
            "max_model_len": limit}  # fmt: skip


PROBES = {name[len("probe_") :]: fn for name, fn in globals().items() if name.startswith("probe_")}


def main() -> None:
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    engine_kwargs = {"enforce_eager": True, "max_model_len": 512, "disable_log_stats": False,
                     **spec["engine_kwargs"]}  # fmt: skip
    llm = LLM(model=spec["model"], dtype="float32", seed=0, **engine_kwargs)
    result = {"platform": type(current_platform).__name__}
    for name in spec["probes"]:
        result[name] = PROBES[name](llm, SamplingParams)
    finish(llm, result)


if __name__ == "__main__":
    main()
