"""Tiny random-weight checkpoints (for tests and benchmarks), with the default model's tokenizer.

Weights are drawn with a larger spread than a real initialisation so the next-token
distributions are peaked: greedy comparisons then test the arithmetic, not float ties.
"""

import json
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
    # MoE (hidden and expert sizes multiples of 32, as vLLM's in-tree CPU MoE kernel needs).
    # Qwen3-MoE: softmax top-3 of 6 experts, renormalized.
    "qwen3-moe": dict(_SMALL, model_type="qwen3_moe", num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, rope_theta=1000000.0,
                      moe_intermediate_size=64, num_experts=6, num_experts_per_tok=3,
                      norm_topk_prob=True),
    # Qwen3-MoE without renormalization; 48 experts and top-3, so a decode step of up to
    # 8 sequences leaves at least 24 experts without a token.
    "qwen3-moe-unnormed": dict(_SMALL, model_type="qwen3_moe", num_attention_heads=4,
                               num_key_value_heads=2, head_dim=32, rope_theta=1000000.0,
                               moe_intermediate_size=32, num_experts=48, num_experts_per_tok=3,
                               norm_topk_prob=False),
    # Mixtral: softmax top-2 of 4 experts, renormalized (w1/w2/w3 expert names).
    "mixtral": dict(_SMALL, model_type="mixtral", num_attention_heads=4, num_key_value_heads=2,
                    head_dim=32, rope_theta=1000000.0, intermediate_size=96,
                    num_local_experts=4, num_experts_per_tok=2),
    # Qwen2-MoE: 5 experts top-2, not renormalized, plus a shared expert behind a sigmoid gate.
    "qwen2-moe": dict(_SMALL, model_type="qwen2_moe", num_attention_heads=4,
                      num_key_value_heads=2, rope_theta=1000000.0, moe_intermediate_size=64,
                      shared_expert_intermediate_size=160, num_experts=5, num_experts_per_tok=2,
                      norm_topk_prob=False),
    # GLM-4.5 MoE: grouped sigmoid routing (8 experts in 4 groups, best 2 groups, top-3) with
    # a random correction bias, routed scaling 2.5, one shared expert, first layer dense.
    "glm4-moe": dict(_SMALL, model_type="glm4_moe", num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32, partial_rotary_factor=0.5,
                     rope_theta=10000.0, moe_intermediate_size=64, n_routed_experts=8,
                     num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=1,
                     routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
                     num_nextn_predict_layers=0, score_correction_bias=0.3),
    # ERNIE-4.5 MoE: softmax top-3 of 6 experts chosen with a random correction bias,
    # renormalized, one shared expert, first layer dense.
    "ernie-moe": dict(_SMALL, model_type="ernie4_5_moe", num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      rope_theta=500000.0, moe_intermediate_size=64, moe_num_experts=6, moe_k=3,
                      moe_num_shared_experts=1, moe_layer_start_index=1,
                      moe_layer_end_index=2, score_correction_bias=0.1),
    # MLA (Multi-head Latent Attention), first layer dense, then MoE with a shared expert.
    # DeepSeek-V2: no query compression (q_lora_rank unset), a small latent (64 + rope 16),
    # softmax top-2 of 6 experts in one group (as DeepSeek-V2-Lite), not renormalized.
    "deepseek-v2": dict(_SMALL, model_type="deepseek_v2", num_attention_heads=4,
                        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=64,
                        qk_nope_head_dim=32, qk_rope_head_dim=16, head_dim=16, v_head_dim=32,
                        moe_intermediate_size=64, n_routed_experts=6, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, topk_method="greedy",
                        n_group=1, topk_group=1, norm_topk_prob=False, rope_theta=10000.0),
    # DeepSeek-V3: compressed queries (q_lora_rank 96), the real latent sizes (512 + rope 64,
    # so vLLM's in-tree CPU MLA backend runs it too), grouped sigmoid routing with a random
    # correction bias (8 experts in 4 groups, best 2 groups, top-3), routed scaling 2.5.
    "deepseek-v3": dict(_SMALL, model_type="deepseek_v3", num_attention_heads=4,
                        num_key_value_heads=4, q_lora_rank=96, kv_lora_rank=512,
                        qk_nope_head_dim=32, qk_rope_head_dim=64, head_dim=64, v_head_dim=32,
                        moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=3,
                        n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
                        routed_scaling_factor=2.5, norm_topk_prob=True,
                        num_nextn_predict_layers=0, scoring_func="sigmoid",
                        topk_method="noaux_tc", score_correction_bias=0.3, rope_theta=10000.0),
}  # fmt: skip

#: Models the plugin refuses at start-up (tests of the refusal), made the same way.
REFUSED_ARCHITECTURES: dict[str, dict] = {
    # PhiMoE: Sparsemixer routing, a custom routing function that no plugin routing op runs.
    # config.json names vLLM's class (transformers spells it PhimoeForCausalLM, which vLLM
    # would run through its Transformers backend instead).
    "phimoe": dict(_SMALL, model_type="phimoe", num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                   vllm_architecture="PhiMoEForCausalLM"),
}  # fmt: skip

#: Random models for `make bench` only: big enough that their compute, not per-step overhead,
#: dominates. Saved in their `dtype`.
BENCHMARK_ARCHITECTURES: dict[str, dict] = {
    # MoE whose experts dominate: 8 layers, hidden 1024, top-4 of 32 experts of width 512
    # (about 0.5 B parameters, 0.4 B of them experts), bfloat16.
    "moe-bench": dict(model_type="qwen3_moe", hidden_size=1024, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                      intermediate_size=2048, moe_intermediate_size=512, num_experts=32,
                      num_experts_per_tok=4, norm_topk_prob=True, rope_theta=1000000.0,
                      initializer_range=0.02, dtype=torch.bfloat16),
}  # fmt: skip

#: The MLA entries of ARCHITECTURES (MoE models too).
MLA_ARCHITECTURES = ("deepseek-v2", "deepseek-v3")

#: The MoE entries of ARCHITECTURES without MLA.
MOE_ARCHITECTURES = ("qwen3-moe", "qwen3-moe-unnormed", "mixtral", "qwen2-moe", "glm4-moe",
                     "ernie-moe")  # fmt: skip


def make_tiny_checkpoint(arch: str, target: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict({**ARCHITECTURES, **REFUSED_ARCHITECTURES, **BENCHMARK_ARCHITECTURES}[arch])
    model_type = settings.pop("model_type")
    dtype = settings.pop("dtype", torch.float32)
    # Spread of the MoE routers' score correction bias (checkpoints start it at zero).
    bias_spread = settings.pop("score_correction_bias", 0.0)
    vllm_architecture = settings.pop("vllm_architecture", None)
    defaults = dict(vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=False,
                    initializer_range=0.08, bos_token_id=1, eos_token_id=2)  # fmt: skip
    config = AutoConfig.for_model(model_type, **(defaults | settings))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Weights the model's own initialisation leaves at zero (ERNIE-4.5's MoE router) are
        # drawn like the others, so that they matter.
        for name, parameter in model.named_parameters():
            if name.endswith(".weight") and parameter.dim() == 2 and not parameter.any():
                parameter.normal_(0.0, config.initializer_range)
        if bias_spread:
            for module in model.modules():
                bias = getattr(module, "e_score_correction_bias", None)
                if isinstance(bias, torch.Tensor):
                    bias.uniform_(-bias_spread, bias_spread)
    if dtype != torch.float32:
        model = model.to(dtype)
        model.config.dtype = dtype
    model.save_pretrained(target, safe_serialization=True)
    if vllm_architecture:
        config_file = target / "config.json"
        saved = json.loads(config_file.read_text())
        config_file.write_text(json.dumps(saved | {"architectures": [vllm_architecture]}, indent=2))
    for name in TOKENIZER_FILES:
        source = tokenizer_dir / name
        if source.exists():
            shutil.copy(source, target / name)
    return target
