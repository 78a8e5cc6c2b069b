"""Quantized checkpoints keep the default model's perplexity, through the plugin: W8A8 int8
within 2% of bf16, 4-bit within 8%.

The text is chapter 1 of Pride and Prejudice (tests/data, public domain), about 1,100 tokens of
SmolLM2's tokenizer, split into equal chunks of at most CHUNK_TOKENS tokens, each its own prompt.
Perplexity = exp(mean negative log-likelihood of every token given its prefix in its chunk),
from vLLM's prompt logprobs (the first token of a chunk has no prefix and is skipped). The bf16
default model, its w8a8-smooth checkpoint (vllm_kunlun.model_zoo.quantized: round-to-nearest
int8 weights, dynamic per-token int8 activations, after SmoothQuant smoothing of the MLPs'
down_proj inputs) and its activation-aware AWQ checkpoint (4-bit groups of 64 with zero
points, AutoAWQ's GEMM format, scales and clipping searched by model_zoo.activation_aware on
the package's own calibration text, not this one) each run once, in bfloat16, on the emulated
XPU. `pytest -s` prints all three.

Measured once (the other schemes are not run here, to keep the suite cheap): bf16 24.65;
w8a8-dynamic 25.50 (+3.44%); w8a8-static 44.29 (+79.7%); w8a8-smooth 24.69 (+0.19%).
Weights alone cost +0.17%: the loss is activation quantization, dominated by the huge
outlier channels of the down_proj inputs, which smoothing moves into the weights; static
per-tensor int8 scales cannot meet 2% on this model with any simple recipe.

4-bit, measured once through the plugin: w4a16 +31.6%, w4a16-asym +15.4%, awq +12.6% rounded
to nearest; awq with activation-aware scaling and clipping 26.00 (+5.50%).
"""

import math
from pathlib import Path

import pytest

from tests.engine import emulation_env, run_generation
from vllm_kunlun.model_zoo.quantized import quantized_checkpoint

pytestmark = pytest.mark.engine

TEXT = Path(__file__).parent / "data" / "pride-and-prejudice-ch1.txt"
CHUNK_TOKENS = 256
#: The issue's bounds: W8A8 may raise perplexity by at most 2% over bf16, 4-bit by 8%.
MAX_RELATIVE_INCREASE = {"w8a8-smooth": 0.02, "awq-activation-aware": 0.08}


def text_chunks(model: Path) -> list[list[int]]:
    """The text's token ids (no BOS: SmolLM2's tokenizer adds none) in equal chunks."""
    from transformers import AutoTokenizer

    lines = TEXT.read_text().splitlines(keepends=True)
    text = "".join(line for line in lines if not line.startswith("#"))
    ids = AutoTokenizer.from_pretrained(model)(text).input_ids
    count = math.ceil(len(ids) / CHUNK_TOKENS)
    size = math.ceil(len(ids) / count)
    return [ids[start : start + size] for start in range(0, len(ids), size)]


def perplexity(prompt_logprobs: list[list[float | None]]) -> float:
    logprobs = [lp for chunk in prompt_logprobs for lp in chunk[1:]]
    assert None not in logprobs and logprobs
    return math.exp(-sum(logprobs) / len(logprobs))


@pytest.fixture(scope="module")
def perplexities(default_model, tmp_path_factory) -> dict[str, float]:
    chunks = text_chunks(default_model)
    prompts = [{"prompt_token_ids": chunk} for chunk in chunks]
    root = tmp_path_factory.mktemp("quantized-default")
    models = {
        "bf16": default_model,
        "w8a8-smooth": quantized_checkpoint(default_model, "w8a8-smooth", root),
        "awq-activation-aware": quantized_checkpoint(default_model, "awq", root,
                                                     activation_aware=True),
    }  # fmt: skip
    figures = {}
    for name, model in models.items():
        result = run_generation(model, prompts, 1, env=emulation_env(), dtype="bfloat16",
                                prompt_logprobs=0, max_model_len=2 * CHUNK_TOKENS)  # fmt: skip
        assert result["platform"] == "EmulatedKunlunPlatform"
        figures[name] = perplexity(result["prompt_logprobs"])
    tokens = sum(len(chunk) - 1 for chunk in chunks)
    print(f"\nperplexity over {tokens} tokens ({len(chunks)} chunks): "
          + ", ".join(f"{name} {value:.4f}" for name, value in figures.items()))  # fmt: skip
    return figures


@pytest.mark.parametrize("scheme", list(MAX_RELATIVE_INCREASE))
def test_quantized_perplexity_within_the_bound_over_bf16(perplexities, scheme):
    bf16, quantized = perplexities["bf16"], perplexities[scheme]
    increase, bound = quantized / bf16 - 1, MAX_RELATIVE_INCREASE[scheme]
    assert increase <= bound, (
        f"{scheme} perplexity {quantized:.4f} vs bf16 {bf16:.4f}: {increase:+.2%} "
        f"(bound {bound:.0%}); all: {perplexities}"
    )
    assert math.isfinite(bf16) and 1 < bf16 < 100, f"bf16 perplexity {bf16:.4f} is implausible"
