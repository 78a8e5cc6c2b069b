"""`vllm-kunlun`: vLLM's command line with the Kunlun plugin, plus plugin commands.

    vllm-kunlun serve [MODEL] [vLLM options]   serve MODEL (default: the prepared default model)
    vllm-kunlun bench|chat|complete|run-batch  as vLLM's own subcommands
    vllm-kunlun default-model                  print the default model's folder (prepare it once)
    vllm-kunlun doctor                         check the set-up; exit status 1 if it cannot serve
    vllm-kunlun check-kernels                  every kernel against the reference (no vLLM needed)
    vllm-kunlun quantize SRC DST --scheme S    write a quantized copy of a checkpoint folder
    vllm-kunlun plan MODEL [vLLM flags]        will it fit: memory per device, context, concurrency

Add --emulate (or set VLLM_KUNLUN_EMULATE=1) to run on the emulated XPU on the host CPU.
"""

import os
import sys

from vllm_kunlun import envs
from vllm_kunlun.supervisor import CHILD_FLAG, supervise

EMULATE_FLAG = "--emulate"
PLUGIN_COMMANDS = ("default-model", "doctor", "check-kernels", "quantize", "plan")
NEEDS_DEVICE = ("serve", "bench", "run-batch")


def _no_device_message() -> str:
    return (
        "vllm-kunlun: no Kunlun XPU was found on this machine (no /dev/xpuN device nodes).\n"
        "To run on the emulated XPU on the host CPU, add --emulate or set VLLM_KUNLUN_EMULATE=1,"
        " for example:\n    vllm-kunlun serve --emulate\n"
    )


def _model_given(args: list[str]) -> bool:
    if any(a == "--model" or a.startswith("--model=") for a in args):
        return True
    return bool(args) and not args[0].startswith("-")


def _default_model_path() -> str:
    from vllm_kunlun.model_zoo.default_model import prepare_default_model

    return str(prepare_default_model())


def build_argv(argv: list[str]) -> list[str]:
    """vLLM CLI arguments for `vllm-kunlun` arguments (the default model filled in)."""
    if argv and argv[0] == "serve" and "--help" not in argv and not _model_given(argv[1:]):
        return ["serve", _default_model_path(), *argv[1:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    supervised = CHILD_FLAG in args
    if supervised:
        args.remove(CHILD_FLAG)
    if EMULATE_FLAG in args:
        args.remove(EMULATE_FLAG)
        os.environ[envs.VLLM_KUNLUN_EMULATE.name] = "1"

    if args[:1] == ["default-model"]:
        print(_default_model_path())
        return 0

    if args[:1] == ["check-kernels"]:
        from vllm_kunlun.ops.check.cli import main as check_kernels_main

        return check_kernels_main(args[1:])

    if args[:1] == ["doctor"]:
        from vllm_kunlun.doctor import main as doctor_main

        return doctor_main(args[1:])

    if args[:1] == ["quantize"]:
        from vllm_kunlun.model_zoo.quantized import main as quantize_main

        return quantize_main(args[1:])

    if args[:1] == ["plan"]:
        from vllm_kunlun.plan.cli import main as plan_main

        return plan_main(args[1:])

    from vllm_kunlun import device

    if args[:1] and args[0] in NEEDS_DEVICE and "--help" not in args:
        if device.detect() is None:
            sys.stderr.write(_no_device_message())
            return 2
        from vllm_kunlun.compat import check_vllm_version

        try:
            check_vllm_version()
        except RuntimeError as error:
            sys.stderr.write(f"vllm-kunlun: {error}\n")
            return 2

    if args[:1] == ["serve"] and "--help" not in args and not supervised:
        return supervise(args)

    from vllm_kunlun.patches import patch_vllm_distribution_name

    patch_vllm_distribution_name()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm-kunlun", *build_argv(args)]
    vllm_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
