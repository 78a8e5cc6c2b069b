"""Tiny random-weight checkpoints (for tests and benchmarks), with the default model's tokenizer.

Weights are drawn with a larger spread than a real initialisation so the next-token
distributions are peaked: greedy comparisons then test the arithmetic, not float ties.
"""

import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

_SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2)

ARCHITECTURES: dict[str, dict] = {
    # GQA 4:2, head_dim 32.
    "llama": dict(_SMALL, model_type="llama", num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, rope_theta=10000.0),
    # GQA 4:1 (MQA-like), head_dim 80, qkv bias.
    "qwen2": dict(_SMALL, model_type="qwen2", hidden_size=320, num_attention_heads=4,
                  num_key_value_heads=1, rope_theta=1000000.0),
    # q/k RMSNorm, GQA 6:2, head_dim 128 (wider than hidden / heads).
    "qwen3": dict(_SMALL, model_type="qwen3", hidden_size=192, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=128, rope_theta=1000000.0),
    # Two thin layers: compute is negligible, so step time is the per-step host overhead.
    "overhead": dict(model_type="llama", hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                     head_dim=32, rope_theta=10000.0),
    # Sliding window of 24 tokens: prompts in the tests are longer, so the window matters.
    "mistral": dict(_SMALL, model_type="mistral", num_attention_heads=4, num_key_value_heads=2,
                    head_dim=32, rope_theta=10000.0, sliding_window=24),
    # Attention and final-logit soft-capping, sliding window on alternate layers, GELU-tanh
    # gating, (1 + w) RMSNorm, query_pre_attn_scalar scaling, tied embeddings.
    "gemma2": dict(_SMALL, model_type="gemma2", num_attention_heads=4, num_key_value_heads=2,
                   head_dim=32, query_pre_attn_scalar=24, sliding_window=24,
                   layer_types=["sliding_attention", "full_attention"],
                   attn_logit_softcapping=20.0, final_logit_softcapping=15.0,
                   hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
    # Fused qkv and gate/up projections, rotary on half of each head.
    "phi3": dict(_SMALL, model_type="phi3", num_attention_heads=4, num_key_value_heads=2,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                  "partial_rotary_factor": 0.5}),
    # Llama 3.1 rope scaling (vLLM's Llama3RotaryEmbedding): with an original context of 256,
    # wavelengths above 256 are slowed 8x and those between 64 and 256 blended.
    "llama3": dict(_SMALL, model_type="llama", num_attention_heads=4, num_key_value_heads=2,
                   head_dim=32,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 256}),
    # YaRN on Qwen3 (vLLM's YaRNScalingRotaryEmbedding): 512 original positions x 4,
    # interpolated low frequencies, cos/sin scaled by YaRN's attention factor.
    "qwen3-yarn": dict(_SMALL, model_type="qwen3", hidden_size=192, num_attention_heads=6,
                       num_key_value_heads=2, head_dim=32,
                       rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0,
                                        "factor": 4.0, "original_max_position_embeddings": 512}),
}  # fmt: skip


def make_tiny_checkpoint(arch: str, target: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(ARCHITECTURES[arch])
    model_type = settings.pop("model_type")
    defaults = dict(vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=False,
                    initializer_range=0.08, bos_token_id=1, eos_token_id=2)  # fmt: skip
    config = AutoConfig.for_model(model_type, **(defaults | settings))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(target, safe_serialization=True)
    for name in TOKENIZER_FILES:
        source = tokenizer_dir / name
        if source.exists():
            shutil.copy(source, target / name)
    return target
