"""Choosing the kernel provider: the Kunlun vendor library, the reference kernels, or the
emulated device's compiled kernels (vllm_kunlun.ops.compiled_provider).

A provider is an object with one method per op in vllm_kunlun.ops.library, taking the op's
arguments in the op's order; tests check that the signatures agree.
"""

import functools
import importlib.util

from vllm_kunlun import envs
from vllm_kunlun.log import get_logger
from vllm_kunlun.ops import reference

logger = get_logger("ops")

OP_NAMES = tuple(reference.__all__)
#: Values VLLM_KUNLUN_KERNELS accepts.
KERNEL_CHOICES = ("auto", "reference", "compiled", "kunlun")


class ReferenceProvider:
    name = "reference"
    description = "reference kernels (plain PyTorch)"

    rms_norm = staticmethod(reference.rms_norm)
    fused_add_rms_norm = staticmethod(reference.fused_add_rms_norm)
    rotary_embedding = staticmethod(reference.rotary_embedding)
    silu_and_mul = staticmethod(reference.silu_and_mul)
    gelu_and_mul = staticmethod(reference.gelu_and_mul)
    reshape_and_cache = staticmethod(reference.reshape_and_cache)

    @staticmethod
    def decode_attention(
        out, query, key_cache, value_cache, block_table, seq_lens, seq_lens_cpu,
        max_seq_len, max_model_len, scale, sliding_window, softcap,
    ) -> None:  # fmt: skip
        # Host copies and max_model_len size vendor kernels; the reference needs neither.
        reference.decode_attention(
            out, query, key_cache, value_cache, block_table, seq_lens,
            max_seq_len, scale, sliding_window, softcap,
        )  # fmt: skip

    @staticmethod
    def prefill_attention(
        out, query, key_cache, value_cache, block_table, query_start_loc, query_start_loc_cpu,
        seq_lens, seq_start_loc, seq_start_loc_cpu, max_query_len, max_seq_len,
        scale, sliding_window, softcap,
    ) -> None:  # fmt: skip
        reference.prefill_attention(
            out, query, key_cache, value_cache, block_table, query_start_loc, seq_lens,
            max_query_len, max_seq_len, scale, sliding_window, softcap,
        )  # fmt: skip

    @staticmethod
    def encoder_attention(
        out, query, key, value, query_start_loc, query_start_loc_cpu, max_query_len, scale
    ) -> None:
        reference.encoder_attention(out, query, key, value, query_start_loc, max_query_len, scale)


def kunlun_library_available() -> bool:
    return importlib.util.find_spec("kunlun_ops") is not None


def choose_provider():
    """The provider VLLM_KUNLUN_KERNELS asks for (see vllm_kunlun.envs)."""
    choice = envs.VLLM_KUNLUN_KERNELS.get().strip().lower()
    if choice not in KERNEL_CHOICES:
        raise ValueError(
            f"VLLM_KUNLUN_KERNELS={choice!r} is not one of {', '.join(KERNEL_CHOICES)}."
        )
    if choice == "kunlun" or (choice == "auto" and kunlun_library_available()):
        from vllm_kunlun.ops.kunlun_binding import KunlunProvider

        return KunlunProvider.load()
    if choice == "reference":
        return ReferenceProvider()
    from vllm_kunlun.ops.compiled_provider import CompiledProvider, compiler_available

    if compiler_available():
        return CompiledProvider()
    if choice == "compiled":
        raise RuntimeError(
            "VLLM_KUNLUN_KERNELS=compiled needs a C++ compiler (`c++` on PATH) to build the "
            "emulated device's kernels; install one (e.g. apt-get install g++) or set "
            "VLLM_KUNLUN_KERNELS=reference."
        )
    logger.warning("vllm-kunlun: no C++ compiler found, so the emulated device runs the "
                   "reference kernels only (slower); install g++ to compile "
                   "them, or set VLLM_KUNLUN_KERNELS=reference to silence this.")  # fmt: skip
    return ReferenceProvider()


@functools.cache
def current_provider():
    provider = choose_provider()
    logger.info("vllm-kunlun kernel provider: %s", provider.description)
    prepare = getattr(provider, "prepare", None)
    if prepare is not None:
        prepare()
    return provider
