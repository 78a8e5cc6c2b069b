"""Kernel providers (vllm_kunlun/ops/provider.py), across every family: which module's kernel
runs each op, which provider VLLM_KUNLUN_KERNELS and the host choose, what an incomplete family
is told, and that the kernel layer runs with torch alone (vLLM unimportable)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vllm_kunlun.ops import build, provider
from vllm_kunlun.ops.kunlun_library import library
from vllm_kunlun.ops.provider import (
    KERNEL_CHOICES,
    PROVIDERS,
    Provider,
    choose_provider,
    declared_ops,
    families,
    ops_of,
)

REPO = Path(__file__).resolve().parents[2]

# Which module's kernel runs each op --------------------------------------------------------------


def test_the_choices_are_auto_and_the_providers():
    assert KERNEL_CHOICES == ("auto", *PROVIDERS) == ("auto", "reference", "compiled", "kunlun")
    with pytest.raises(ValueError, match="unknown kernel provider 'triton'"):
        Provider("triton")


def test_the_reference_provider_runs_every_family_reference():
    reference = Provider("reference")
    assert set(reference.kernels) == set(declared_ops())
    for op, spec in declared_ops().items():
        assert reference.sources[op] == f"{spec.family}.reference"
        assert reference.kernel(op) is getattr(reference, op)


def test_the_compiled_provider_runs_the_fast_kernels_where_they_exist():
    compiled = Provider("compiled")
    fast = {op for op, source in compiled.sources.items() if source.endswith(".compiled")}
    assert fast == {"rms_norm", "fused_add_rms_norm", "rotary_embedding", "reshape_and_cache",
                    "decode_attention", "moe_experts", "moe_experts_w8a8", "moe_experts_wna16",
                    "int8_scaled_mm", "wna16_gemm", "wna16_dequant"}  # fmt: skip
    for op in set(declared_ops()) - fast:  # the rest is the reference, the emulated kernel
        assert compiled.kernel(op) is Provider("reference").kernel(op)


def test_the_kunlun_provider_binds_every_op_or_names_the_reference():
    kunlun = Provider("kunlun")  # resolving needs no kunlun_ops; prepare() does
    assert set(kunlun.kernels) == set(declared_ops())
    named_reference = {op for op, source in kunlun.sources.items() if source.endswith("reference")}
    # no recorded kunlun_ops kernel (KUNLUN.md §2b, §2g: only xspeedgate_ops; the int4
    # awq_gemm / awq_dequantize take no 8-bit weights; §2d: the MLA cache gather is recorded in
    # xspeedgate_ops only)
    assert named_reference == {"gelu_and_mul", "int8_quant_static", "w8a16_gemm",
                               "mla_gather_cache"}  # fmt: skip


def test_an_unknown_op_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_op"):
        Provider("reference").no_such_op  # noqa: B018


def family_without(monkeypatch, family: str, name: str, missing_op: str | None = None) -> None:
    """Make `family`'s `name`.py absent, or present without `missing_op`."""
    real = provider._family_module

    def module(fam: str, prov: str):
        found = real(fam, prov)
        if (fam, prov) != (family, name):
            return found
        if missing_op is None:
            return None
        return SimpleNamespace(**{op: getattr(found, op) for op in ops_of(fam) if op != missing_op})

    monkeypatch.setattr(provider, "_family_module", module)


@pytest.mark.parametrize("name", ["reference", "kunlun"])
def test_a_family_without_a_complete_provider_module_is_an_error(monkeypatch, name):
    family_without(monkeypatch, "norm", name)
    with pytest.raises(RuntimeError, match=f"op family 'norm' has no {name}.py"):
        Provider(name)
    monkeypatch.undo()
    family_without(monkeypatch, "norm", name, missing_op="gemma_rms_norm")
    with pytest.raises(RuntimeError, match=f"norm/{name}.py does not define the op 'gemma_rms"):
        Provider(name)


def test_a_family_without_compiled_kernels_runs_the_reference(monkeypatch):
    family_without(monkeypatch, "norm", "compiled")
    compiled = Provider("compiled")
    assert {compiled.sources[op] for op in ops_of("norm")} == {"norm.reference"}


# Choosing the provider ---------------------------------------------------------------------


def test_auto_compiles_when_a_compiler_exists_and_reference_is_kept_on_request(monkeypatch):
    monkeypatch.setattr(provider, "kunlun_library_available", lambda: False)
    monkeypatch.setattr(build, "compiler_available", lambda: True)
    monkeypatch.setenv("VLLM_KUNLUN_KERNELS", "auto")
    assert choose_provider().name == "compiled"
    monkeypatch.setenv("VLLM_KUNLUN_KERNELS", "reference")
    assert choose_provider().name == "reference"


def test_without_a_compiler_auto_uses_the_reference_and_compiled_says_what_to_do(monkeypatch):
    monkeypatch.setattr(provider, "kunlun_library_available", lambda: False)
    monkeypatch.setattr(build, "compiler_available", lambda: False)
    monkeypatch.setenv("VLLM_KUNLUN_KERNELS", "auto")
    assert choose_provider().name == "reference"
    monkeypatch.setenv("VLLM_KUNLUN_KERNELS", "compiled")
    needs = "needs a C\\+\\+ compiler.*VLLM_KUNLUN_KERNELS=reference"
    with pytest.raises(RuntimeError, match=needs):
        choose_provider()


def test_an_unknown_choice_is_refused(monkeypatch):
    monkeypatch.setenv("VLLM_KUNLUN_KERNELS", "fastest")
    with pytest.raises(ValueError, match="VLLM_KUNLUN_KERNELS='fastest' is not one of auto"):
        choose_provider()


def test_auto_chooses_kunlun_when_kunlun_ops_imports(use_standin, monkeypatch):
    use_standin()
    monkeypatch.setenv("VLLM_KUNLUN_KERNELS", "auto")
    chosen = choose_provider()
    assert chosen.name == "kunlun"
    assert library() is sys.modules["kunlun_ops"]
    x = torch.randn(2, 8)
    chosen.rms_norm(x, torch.ones(8), 1e-6)  # prepared: the forms are known
    assert sys.modules["kunlun_ops"].CALLS["rmsnorm"] == 1


def test_reference_is_chosen_on_request_even_with_kunlun_ops(use_standin, monkeypatch):
    use_standin()
    monkeypatch.setenv("VLLM_KUNLUN_KERNELS", "reference")
    assert choose_provider().name == "reference"


def test_without_kunlun_ops_auto_falls_back_and_kunlun_fails(monkeypatch):
    monkeypatch.setitem(sys.modules, "kunlun_ops", None)
    monkeypatch.setenv("VLLM_KUNLUN_KERNELS", "auto")
    assert choose_provider().name == ("compiled" if build.compiler_available() else "reference")
    monkeypatch.setenv("VLLM_KUNLUN_KERNELS", "kunlun")
    with pytest.raises(RuntimeError, match="needs the Kunlun kernel library kunlun_ops"):
        choose_provider()


def test_load_explains_a_missing_library(monkeypatch):
    monkeypatch.setitem(sys.modules, "kunlun_ops", None)  # makes `import kunlun_ops` fail
    with pytest.raises(RuntimeError, match="import kunlun_ops.*VLLM_KUNLUN_KERNELS=reference"):
        Provider("kunlun").prepare()


# The kernel layer needs torch only ---------------------------------------------------------

WITHOUT_VLLM = textwrap.dedent(
    """
    import json, sys
    sys.modules["vllm"] = None  # `import vllm` (and any vllm.*) now raises ImportError
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("vllm still imports")

    import torch
    from vllm_kunlun.ops.provider import Provider, declared_ops, families

    result = {"families": list(families()), "ops": sorted(declared_ops())}
    reference = Provider("reference").prepare()
    compiled = Provider("compiled")
    if sys.argv[1] == "build":
        compiled.prepare()  # builds (or loads the cached) C++ kernels
    Provider("kunlun")  # its modules import; only prepare() needs kunlun_ops
    from vllm_kunlun.ops import norm

    x = torch.randn(3, 8)
    for provider in (reference, compiled) if sys.argv[1] == "build" else (reference,):
        torch.testing.assert_close(provider.rms_norm(x, torch.ones(8), 1e-6),
                                   norm.reference.rms_norm(x, torch.ones(8), 1e-6))
    result["sources"] = compiled.sources
    result["vllm_modules"] = sorted(name for name, module in sys.modules.items()
                                    if name.split(".")[0] == "vllm" and module is not None)
    print(json.dumps(result))
    """
)


def test_families_and_providers_import_and_run_without_vllm():
    built = "build" if build.compiler_available() else "no-build"
    env = {**os.environ, "VLLM_KUNLUN_KERNELS": "auto"}
    proc = subprocess.run([sys.executable, "-c", WITHOUT_VLLM, built], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["vllm_modules"] == [], "the kernel layer imported vLLM"
    assert result["families"] == list(families())
    assert result["ops"] == sorted(declared_ops())
    assert result["sources"] == Provider("compiled").sources
