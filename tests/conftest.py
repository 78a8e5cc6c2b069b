from pathlib import Path

import pytest

from tests.engine import default_model_dir
from vllm_kunlun.model_zoo.tiny import make_tiny_checkpoint


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
