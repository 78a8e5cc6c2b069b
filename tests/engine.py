"""Shared helpers for tests that start vLLM engines or compare with Hugging Face transformers."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "In 1969, the first person to walk on the moon",
    "A haiku about the sea:",
    "The quick brown fox",
]


def run_generation(
    model: str | Path,
    prompts: list[str],
    max_tokens: int,
    *,
    env: dict[str, str] | None = None,
    dtype: str = "float32",
    timeout: int = 600,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    embed: bool = False,
    memory: bool = False,
    in_process: bool = False,
    **engine_kwargs,
) -> dict:
    """Greedy generation in a fresh process; returns {"platform", "token_ids", "texts", "log"}
    (and "logprobs" with the top `logprobs` tokens of every generated position, if asked; with
    `prompt_logprobs` set, "prompt_logprobs": per prompt, each prompt token's logprob given its
    prefix, None for the first token).
    With embed=True the model is a pooling model and the result holds "embeddings" instead.
    With memory=True it also holds "memory": each worker's kunlun_memory_report and the
    engine's KV-cache block count (with in_process=True, where the engine's config is this
    process's).

    `env` entries are added to (or, with value None, removed from) the current environment.
    in_process=True runs vLLM's engine core in the generating process instead of a process of
    its own (VLLM_ENABLE_V1_MULTIPROCESSING=0): one interpreter start and vLLM import fewer,
    about 8 s per engine on the CI machines, for checks that do not look at the process layout.
    """
    spec = {"model": str(model), "prompts": prompts, "max_tokens": max_tokens, "dtype": dtype,
            "engine_kwargs": engine_kwargs, "logprobs": logprobs,
            "prompt_logprobs": prompt_logprobs, "embed": embed, "memory": memory}  # fmt: skip
    child_env = dict(os.environ)
    if in_process:
        child_env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    for key, value in (env or {}).items():
        if value is None:
            child_env.pop(key, None)
        else:
            child_env[key] = value
    proc = subprocess.run(
        [sys.executable, "-m", "tests.generate", json.dumps(spec)],
        cwd=REPO, env=child_env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"generation failed (exit {proc.returncode}):\n{log[-6000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    result["log"] = log
    return result


#: Environment for a run through vLLM's in-tree CPU backend: the plugin stays inactive.
IN_TREE_ENV: dict[str, str | None] = {"VLLM_KUNLUN_EMULATE": None}


def emulation_env(op_stats_dir: str | Path | None = None, **extra: str) -> dict[str, str]:
    env = {"VLLM_KUNLUN_EMULATE": "1", "VLLM_KUNLUN_EMULATED_MEMORY_GIB": "2"}
    if op_stats_dir is not None:
        env["VLLM_KUNLUN_OP_STATS"] = str(op_stats_dir)
    env.update(extra)
    return env


def read_op_stats(directory: str | Path) -> dict[str, int]:
    """Op counts summed over every ops-<pid>.json in `directory`."""
    total: dict[str, int] = {}
    for path in Path(directory).glob("ops-*.json"):
        for name, count in json.loads(path.read_text()).items():
            total[name] = total.get(name, 0) + count
    return total


def hf_greedy(model: str | Path, prompts: list[str], max_tokens: int) -> list[list[int]]:
    """Hugging Face transformers' greedy continuations (float32), as token ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    # Eager attention: the one transformers implements soft-capping (Gemma 2) in.
    hf_model = AutoModelForCausalLM.from_pretrained(
        model, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens, _ = greedy_loop(hf_model, tokenizer, prompts, max_tokens)
    return tokens


def greedy_loop(
    hf_model, tokenizer, prompts: list[str], max_tokens: int
) -> tuple[list[list[int]], list[list[float]]]:
    """A transformers model's greedy continuations (token ids), and at each generated position
    the margin between the best and the second-best logit.

    A plain argmax loop: `generate(min_new_tokens=...)` would mask EOS, while vLLM's
    `ignore_eos` keeps EOS as a candidate and only keeps going after it.
    """
    import torch

    results, margins = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out = hf_model(ids, use_cache=True)
            generated: list[int] = []
            gaps: list[float] = []
            for _ in range(max_tokens):
                logits = out.logits[0, -1]
                next_id = logits.argmax().item()
                best_two = logits.topk(2).values
                generated.append(next_id)
                gaps.append(float(best_two[0] - best_two[1]))
                out = hf_model(
                    torch.tensor([[next_id]]), past_key_values=out.past_key_values, use_cache=True
                )
            results.append(generated)
            margins.append(gaps)
    return results, margins


def default_model_dir() -> Path:
    from vllm_kunlun.model_zoo.default_model import prepare_default_model

    return prepare_default_model()
