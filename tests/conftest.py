from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine import default_model_dir
from vllm_kunlun.model_zoo.tiny import make_tiny_checkpoint
from vllm_kunlun.ops.provider import current_provider


@pytest.fixture(scope="session")
def default_model() -> Path:
    return default_model_dir()


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, default_model):
    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in made:
            target = tmp_path_factory.mktemp(f"tiny-{arch}")
            made[arch] = make_tiny_checkpoint(arch, target, default_model)
        return made[arch]

    return make


@pytest.fixture
def reference_ops(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """torch.ops.kunlun.* backed by the reference provider, whatever an earlier test chose."""
    monkeypatch.setenv("VLLM_KUNLUN_KERNELS", "reference")
    current_provider.cache_clear()
    assert current_provider().name == "reference"
    yield
    current_provider.cache_clear()  # the next user chooses again, under its own environment
