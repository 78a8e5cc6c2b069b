"""Run greedy generation through vLLM in a fresh process and print the result as JSON.

Used by the tests (tests/engine.py) so every engine starts in its own process with its own
environment. Usage: python -m tests.generate SPEC_JSON  where SPEC_JSON holds
{"model", "prompts", "max_tokens", "dtype", "engine_kwargs"} and optionally "logprobs" (top-k
per generated position, returned as token-id -> logprob dicts), "prompt_logprobs" (any int:
return, per prompt, the logprob of each prompt token given its prefix, None for the first),
"embed" (embed the prompts with a pooling model instead of generating) or "memory" (add each
worker's kunlun_memory_report and the engine's KV-cache block count). Prompts are strings or
{"prompt_token_ids": [...]}; engines are eager unless engine_kwargs says otherwise.
"""

import json
import os
import sys
from typing import NoReturn


def main() -> None:
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    engine_kwargs = {"enforce_eager": True, "max_model_len": 1024, **spec["engine_kwargs"]}
    llm = LLM(model=spec["model"], dtype=spec["dtype"], seed=0, **engine_kwargs)
    if spec.get("embed"):
        embeddings = [o.outputs.embedding for o in llm.embed(spec["prompts"])]
        finish(llm, {"platform": type(current_platform).__name__, "embeddings": embeddings})
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True,
                            logprobs=spec.get("logprobs"),
                            prompt_logprobs=spec.get("prompt_logprobs"))  # fmt: skip
    outputs = llm.generate(spec["prompts"], params)
    result = {
        "platform": type(current_platform).__name__,
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "texts": [o.outputs[0].text for o in outputs],
    }
    if spec.get("logprobs"):
        result["logprobs"] = [
            [{str(token): lp.logprob for token, lp in position.items()}
             for position in o.outputs[0].logprobs]
            for o in outputs
        ]  # fmt: skip
    if spec.get("memory"):  # what each worker's emulated XPU holds, and the engine's KV cache
        cache = llm.llm_engine.vllm_config.cache_config
        result["memory"] = {"workers": llm.collective_rpc("kunlun_memory_report"),
                            "num_gpu_blocks": cache.num_gpu_blocks,
                            "kv_cache_size_tokens": cache.kv_cache_size_tokens}  # fmt: skip
    if spec.get("prompt_logprobs") is not None:
        result["prompt_logprobs"] = [
            [None if position is None else position[token].logprob
             for token, position in zip(o.prompt_token_ids, o.prompt_logprobs, strict=True)]
            for o in outputs
        ]  # fmt: skip
    finish(llm, result)


def finish(llm, result: dict) -> NoReturn:
    """Print the result, stop the engine, and leave without interpreter teardown.

    Workers write their op counts (and the stand-in kunlun_ops its call counts) on request
    before the engine is shut down: a worker slow to stop is killed and skips its exit hooks.
    The process then ends with os._exit: at normal interpreter exit, a native thread left
    behind by vLLM's pooling path (in-tree backend or plugin alike) sometimes aborts the process
    ("terminate called without an active exception", exit -6) after the work is done.
    """
    print("RESULT " + json.dumps(result), flush=True)
    stats_dir = os.environ.get("VLLM_KUNLUN_OP_STATS")
    if stats_dir:
        from vllm_kunlun.ops import stats

        if os.environ.get("VLLM_KUNLUN_EMULATE"):  # workers of the plugin: Ray ones too
            llm.collective_rpc("write_op_stats")
    if os.environ.get("KUNLUN_STANDIN_CALLS"):
        import kunlun_ops  # the stand-in (tests/standin), on PYTHONPATH for this test

        llm.collective_rpc(kunlun_ops.write_calls)  # pickled: needs insecure serialization
    llm.llm_engine.engine_core.shutdown()
    if stats_dir:  # an engine in this process counts here too
        stats.write_stats(stats_dir)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
