"""The norm family's Kunlun binding (vllm_kunlun/ops/norm/kunlun.py) against the recorded
kunlun_ops API (KUNLUN.md §2a), through the stand-in library (tests/standin): every call is
checked against the recorded contract and must give the reference kernels' results. This is all
the verification the binding has until it runs on a Kunlun XPU."""

import pytest
import torch

from tests.ops.helpers import DTYPES, standin_calls, wide_view
from vllm_kunlun.ops.norm import kunlun as norm_kunlun
from vllm_kunlun.ops.norm import reference
from vllm_kunlun.ops.provider import Provider

# Loading: the signature forms ----------------------------------------------------------------


@pytest.mark.parametrize("form", ["active", "legacy"])
def test_load_picks_and_logs_the_signature_form(form, use_standin, ops_log):
    use_standin(form)
    Provider("kunlun").prepare()
    assert norm_kunlun.forms == {"rmsnorm": form, "add_rmsnorm": form}
    message = "\n".join(r.getMessage() for r in ops_log.records)
    assert f"rmsnorm uses the {form} form, add_rmsnorm the {form} form" in message
    assert "0.1.58+standin" in message


@pytest.mark.parametrize(
    ("probe", "fn", "form"),
    [
        ("rmsnorm", lambda x, weight, output, eps: None, "active"),
        ("rmsnorm", lambda x, weight, out, eps, interweave=False: None, "active"),
        ("rmsnorm", lambda x, weight, eps, out=None: None, "legacy"),
        ("add_rmsnorm", lambda x, residual, residual_output=None, weight=None, eps=1e-6,
         output=None, bias=None: None, "active"),
        ("add_rmsnorm", lambda x, y, weight, eps, out=None: None, "legacy"),
    ],
)  # fmt: skip
def test_signature_probe_tolerates_unrecorded_parameter_names(probe, fn, form):
    assert getattr(norm_kunlun, f"{probe}_form")(fn) == form


def test_load_rejects_an_unrecognized_rmsnorm_signature(use_standin, monkeypatch):
    ops = use_standin()
    monkeypatch.setattr(ops, "rmsnorm", lambda x, weight, scale, out: None)
    with pytest.raises(RuntimeError, match="rmsnorm.*matches neither recorded form"):
        Provider("kunlun").prepare()


def test_load_rejects_a_build_without_the_gemma_norms(use_standin, monkeypatch):
    ops = use_standin()
    monkeypatch.delattr(ops, "gemma_rmsnorm")
    with pytest.raises(RuntimeError, match="kunlun_ops.gemma_rmsnorm is missing"):
        Provider("kunlun").prepare()
    monkeypatch.undo()
    ops = use_standin()
    monkeypatch.setattr(ops, "gemma_add_rmsnorm", lambda x, y, weight, output, eps: None)
    with pytest.raises(RuntimeError, match="gemma_add_rmsnorm does not accept residual_output"):
        Provider("kunlun").prepare()


# RMS norm (x * w), in both recorded forms ------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_rms_norm(form_kunlun, dtype, contiguous):
    hidden = 48
    x = torch.randn(5, hidden).to(dtype) if contiguous else wide_view(5, hidden, dtype)
    weight = torch.randn(hidden).to(dtype)
    got = form_kunlun.rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(got, reference.rms_norm(x, weight, 1e-6))
    assert standin_calls() == {"rmsnorm": 1}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_fused_add_rms_norm_is_in_place(form_kunlun, dtype, contiguous):
    hidden = 48
    make = (lambda: torch.randn(5, hidden).to(dtype)) if contiguous else (
        lambda: wide_view(5, hidden, dtype))  # fmt: skip
    x, residual = make(), make()
    weight = torch.randn(hidden).to(dtype)
    want_x, want_residual = x.clone(), residual.clone()
    reference.fused_add_rms_norm(want_x, want_residual, weight, 1e-6)
    form_kunlun.fused_add_rms_norm(x, residual, weight, 1e-6)
    torch.testing.assert_close(residual, want_residual)
    torch.testing.assert_close(x, want_x)
    assert standin_calls() == {"add_rmsnorm": 1}


def test_standin_rejects_the_other_rmsnorm_form(use_standin):
    ops = use_standin("active")
    x, weight = torch.randn(2, 8), torch.randn(8)
    with pytest.raises(AssertionError, match="recorded form"):
        ops.rmsnorm(x, weight.float(), 1e-6, out=torch.empty_like(x))
    ops = use_standin("legacy")
    with pytest.raises(AssertionError, match="recorded form"):
        ops.rmsnorm(x, weight, torch.empty_like(x), 1e-6)


# Gemma's RMS norm (x * (1 + w)) ----------------------------------------------------------------

GEMMA_LAYOUTS = ["2d", "3d", "strided"]


def gemma_input(layout: str, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    if layout == "2d":
        return torch.randn(5, hidden).to(dtype)
    if layout == "3d":  # the binding flattens it to [rows, hidden], as the recorded caller does
        return torch.randn(2, 3, hidden).to(dtype)
    return wide_view(5, hidden, dtype)


def gemma_weight(hidden: int, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(hidden) * 0.5).to(dtype)  # Gemma stores w centred on 0, model dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", GEMMA_LAYOUTS)
def test_gemma_rms_norm(kunlun, dtype, layout):
    hidden = 130
    x = gemma_input(layout, hidden, dtype)
    weight = gemma_weight(hidden, dtype)
    x_before = x.clone()
    got = kunlun.gemma_rms_norm(x, weight, 1e-6)
    assert got.shape == x.shape and got.dtype == dtype
    torch.testing.assert_close(got, reference.gemma_rms_norm(x, weight, 1e-6))
    assert torch.equal(x, x_before)
    assert standin_calls() == {"gemma_rmsnorm": 1}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", GEMMA_LAYOUTS)
def test_gemma_fused_add_rms_norm_is_in_place(kunlun, dtype, layout):
    hidden = 130
    x, residual = gemma_input(layout, hidden, dtype), gemma_input(layout, hidden, dtype)
    weight = gemma_weight(hidden, dtype)
    want_x, want_residual = x.clone(), residual.clone()
    reference.gemma_fused_add_rms_norm(want_x, want_residual, weight, 1e-6)
    x_ptr, residual_ptr = x.data_ptr(), residual.data_ptr()

    assert kunlun.gemma_fused_add_rms_norm(x, residual, weight, 1e-6) is None

    assert (x.data_ptr(), residual.data_ptr()) == (x_ptr, residual_ptr)
    torch.testing.assert_close(residual, want_residual)
    torch.testing.assert_close(x, want_x)
    assert standin_calls() == {"gemma_add_rmsnorm": 1}


def gemma_call(ops, **change) -> None:
    """One gemma_add_rmsnorm call as the binding makes it, with `change` applied."""
    x, y = torch.randn(2, 4, 16).to(torch.bfloat16).unbind(0)
    kwargs = dict(weight=torch.randn(16).to(torch.bfloat16), output=torch.empty_like(x),
                  eps=1e-6, residual_output=torch.empty_like(x))  # fmt: skip
    args = [x, y]
    for name, value in change.items():
        if name in ("x", "y"):
            args[name == "y"] = value(x, y)
        elif callable(value):
            kwargs[name] = value(x, y)
        else:
            kwargs.pop(name)
    ops.gemma_add_rmsnorm(*args, **kwargs)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(residual_output=lambda x, y: y), "residual_output must not alias y"),
        (dict(residual_output=lambda x, y: x), "residual_output must not alias x"),
        (dict(output=lambda x, y: x), "output must not alias x"),
        (dict(weight=lambda x, y: torch.randn(16)), "weight must be torch.bfloat16"),
        (dict(x=lambda x, y: x.unsqueeze(0), y=lambda x, y: y.unsqueeze(0)), "x must be 2-D"),
        (dict(x=lambda x, y: x.t().contiguous().t()), "x must be contiguous"),
        (dict(output=lambda x, y: torch.empty(8, 16, dtype=x.dtype)), "preallocated"),
        (dict(residual_output=None), "recorded form"),
    ],
    ids=["residual-output-aliases-y", "residual-output-aliases-x", "output-aliases-x",
         "fp32-weight", "3d-x", "non-contiguous-x", "wrong-output-shape", "missing-keyword"],
)  # fmt: skip
def test_standin_rejects_gemma_add_rmsnorm_contract_violations(use_standin, change, message):
    ops = use_standin()
    gemma_call(ops)  # the binding's own call form is accepted
    with pytest.raises(AssertionError, match=message):
        gemma_call(ops, **change)


def test_standin_rejects_gemma_rmsnorm_contract_violations(use_standin):
    ops = use_standin()
    x, weight = torch.randn(4, 16).to(torch.float16), torch.randn(16).to(torch.float16)
    ops.gemma_rmsnorm(x, weight, torch.empty_like(x), 1e-6, False, False, None, False)
    with pytest.raises(AssertionError, match="x must be 2-D"):
        x3 = x.view(2, 2, 16)
        ops.gemma_rmsnorm(x3, weight, torch.empty_like(x3), 1e-6, False, False, None, False)
    with pytest.raises(AssertionError, match="x must be contiguous"):
        ops.gemma_rmsnorm(x[:, :8], weight[:8], torch.empty(4, 8, dtype=x.dtype), 1e-6, False,
                          False, None, False)  # fmt: skip
    with pytest.raises(AssertionError, match="weight must be torch.float16"):
        ops.gemma_rmsnorm(x, weight.float(), torch.empty_like(x), 1e-6, False, False, None, False)
    with pytest.raises(AssertionError, match="output must be a tensor"):  # not preallocated
        ops.gemma_rmsnorm(x, weight, None, 1e-6, False, False, None, False)
    with pytest.raises(AssertionError, match="recorded form"):  # keywords, or missing arguments
        ops.gemma_rmsnorm(x, weight, output=torch.empty_like(x), eps=1e-6)
