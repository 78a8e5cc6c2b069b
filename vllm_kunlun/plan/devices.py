"""The devices a plan is for, and where each figure comes from. The one place P800 facts live.

P800 memory: `xpu-smi` reports the card as "P800 OAM (96.0GB)" (../shared/KUNLUN.md §1.4, from
baidu/vLLM-Kunlun issue #315). Whether that is 96 x 10^9 or 96 x 2^30 bytes is not recorded; the
plan takes the smaller, 96 x 10^9 bytes (89.4 GiB). Pass --device-memory-gib with what
`xpu-smi` or `torch.cuda.get_device_properties(i).total_memory` shows on your cards to plan
with the exact figure.
"""

from dataclasses import dataclass

from vllm_kunlun import envs

GiB = 1 << 30


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int
    #: Where memory_bytes comes from.
    source: str
    #: True when vLLM would take its host-CPU batch defaults for this device (the emulated XPU
    #: is a CpuPlatform to vLLM).
    host_defaults: bool = False


P800 = Device(
    "Kunlun P800",
    96 * 10**9,
    'xpu-smi reports "P800 OAM (96.0GB)" (KUNLUN.md §1.4; read as 96 x 10^9 bytes)',
)


def emulated() -> Device:
    gib = float(envs.VLLM_KUNLUN_EMULATED_MEMORY_GIB.get())
    return Device("Kunlun P800 (emulated on the host CPU)", int(gib * GiB),
                  f"VLLM_KUNLUN_EMULATED_MEMORY_GIB={gib:g}", host_defaults=True)  # fmt: skip


def custom(gib: float) -> Device:
    if gib <= 0:
        raise ValueError(f"--device-memory-gib must be positive, got {gib:g}.")
    return Device(f"device with {gib:g} GiB", int(gib * GiB), f"--device-memory-gib {gib:g}")


DEVICES = {"p800": lambda: P800, "emulated": emulated}


def batch_defaults(device: Device, world_size: int) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) vLLM 0.32 picks for `vllm serve` on `device`
    when the user sets neither (EngineArgs.get_batch_defaults, by device memory)."""
    if device.host_defaults:
        return 2048 * world_size, 128 * world_size
    if device.memory_bytes >= 160 * GiB:
        return 16384, 1024
    if device.memory_bytes >= 70 * GiB:
        return 8192, 1024
    return 2048, 256
