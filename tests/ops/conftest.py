"""Fixtures of the kernel tests. tests/ops mirrors vllm_kunlun/ops: one folder per op family with
test_reference.py (the reference kernels against plain formulas), test_compiled.py (the emulated
device's C++ fast path) and test_kunlun.py (the Kunlun binding against the stand-in library)."""

import importlib
import logging
import sys
from collections.abc import Callable, Iterator
from types import ModuleType

import pytest
import torch

from tests.ops.helpers import STANDIN
from vllm_kunlun.ops.provider import Provider


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: the reference tests' tensors are tiny, and a second thread only adds
    contention on a busy 2-core machine (several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def use_standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], ModuleType]]:
    """use_standin(form) -> the stand-in kunlun_ops, freshly imported with that signature form."""

    def use(form: str = "active") -> ModuleType:
        monkeypatch.setenv("KUNLUN_STANDIN_FORM", form)
        monkeypatch.syspath_prepend(str(STANDIN))
        sys.modules.pop("kunlun_ops", None)  # a cached import may carry the other form
        return importlib.import_module("kunlun_ops")

    yield use
    sys.modules.pop("kunlun_ops", None)


@pytest.fixture
def kunlun(use_standin) -> Provider:
    """The Kunlun provider over the stand-in library (active signature forms), prepared."""
    use_standin("active")
    return Provider("kunlun").prepare()


@pytest.fixture(params=["active", "legacy"])
def form_kunlun(request, use_standin) -> Provider:
    """The Kunlun provider over the stand-in library in each recorded signature form."""
    use_standin(request.param)
    return Provider("kunlun").prepare()


@pytest.fixture
def ops_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Records of the kernel layer's logger ("vllm.kunlun.ops")."""
    # Plugin loggers live under vLLM's "vllm" logger, which may not propagate to the root.
    from vllm_kunlun.ops.provider import logger

    caplog.set_level(logging.INFO, logger=logger.name)
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)
