"""GPTQ and AWQ checkpoints on the plugin's platform: vLLM's methods, the plugin's kernel.

vLLM 0.32 sends a `quant_method: gptq` checkpoint to `AutoGPTQConfig` and an `awq` one to
`AutoAWQConfig`. Both then refuse, or pick a CUDA kernel, on any platform but CUDA, ROCm, CPU
and Intel XPU: the GPTQ linear method checks Marlin support against the device's NVIDIA compute
capability (the plugin reports none), and the AWQ config routes other platforms to
`AutoAWQLinearMethod`, whose `awq_gemm` is a CUDA kernel. So the plugin registers its own two
configs (`register_quantization_config`, vLLM's public seam for this; custom names are probed
before the built-in ones) that claim those checkpoints on a Kunlun platform only, and reuse
vLLM's weight creation and loading unchanged: the linear methods subclass vLLM's and drop only
the Marlin check, so the weight still goes through `choose_mp_linear_kernel`, i.e. the plugin's
KunlunWNA16LinearKernel. Everything else (MoE experts, GPTQ's act-order) is refused before
start-up by checkpoint_config.
"""

from typing import Any

import torch
from vllm.model_executor.layers.quantization.auto_awq import (
    AutoAWQConfig,
    AutoAWQMarlinLinearMethod,
)
from vllm.model_executor.layers.quantization.auto_gptq import (
    AutoGPTQConfig,
    AutoGPTQLinearMethod,
)
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
from vllm.model_executor.layers.quantization.utils.gptq_utils import get_linear_quant_method

from vllm_kunlun.quantization.checkpoint_config import on_kunlun_platform

GPTQ_NAME = "kunlun_gptq"
AWQ_NAME = "kunlun_awq"
#: What a user may pass as --quantization for each checkpoint method.
_USER_NAMES = {
    "gptq": (None, "gptq", "gptq_marlin", "auto_gptq", GPTQ_NAME),
    "awq": (None, "awq", "awq_marlin", "auto_awq", AWQ_NAME),
}


def _claims(hf_quant_cfg: dict[str, Any], user_quant: str | None, method: str) -> bool:
    """A `method` checkpoint served on a Kunlun platform (other platforms keep vLLM's)."""
    checkpoint = str(hf_quant_cfg.get("quant_method", "")).lower()
    return on_kunlun_platform() and checkpoint == method and user_quant in _USER_NAMES[method]


class KunlunGPTQLinearMethod(AutoGPTQLinearMethod):
    def __init__(self, quant_config: AutoGPTQConfig) -> None:
        # vLLM's __init__ only adds verify_marlin_supported (a CUDA capability check).
        self.quant_config = quant_config
        self.input_dtype = None
        self.quant_type = quant_config.quant_type


class KunlunAWQLinearMethod(AutoAWQMarlinLinearMethod):
    def __init__(self, quant_config: AutoAWQConfig) -> None:
        # vLLM's __init__ only adds verify_marlin_supported (a CUDA capability check).
        self.quant_config = quant_config
        self.quant_type = quant_config.quant_type
        self.input_dtype = None


class _OnKunlun:
    """What the plugin's GPTQ and AWQ configs share: their own name, no capability or dtype
    restriction beyond the kernel's, and claiming their method's checkpoints on a Kunlun
    platform."""

    NAME: str
    CHECKPOINT_METHOD: str

    @classmethod
    def get_name(cls) -> str:
        return cls.NAME

    @classmethod
    def get_min_capability(cls) -> int:
        return -1

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        return cls.NAME if _claims(hf_quant_cfg, user_quant, cls.CHECKPOINT_METHOD) else None


class KunlunGPTQConfig(_OnKunlun, AutoGPTQConfig):
    """GPTQ 4-bit symmetric checkpoints through KunlunWNA16LinearKernel."""

    NAME, CHECKPOINT_METHOD = GPTQ_NAME, "gptq"

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        return get_linear_quant_method(self, layer, prefix, KunlunGPTQLinearMethod)


class KunlunAWQConfig(_OnKunlun, AutoAWQConfig):
    """AWQ 4-bit (GEMM) checkpoints through KunlunWNA16LinearKernel."""

    NAME, CHECKPOINT_METHOD = AWQ_NAME, "awq"

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
        from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped

        if not isinstance(layer, LinearBase):
            return None
        skipped = is_layer_skipped(
            prefix,
            self.modules_to_not_convert,
            self.packed_modules_mapping,
            match_mode="substring",
        )
        return UnquantizedLinearMethod() if skipped else KunlunAWQLinearMethod(self)


CONFIGS = {GPTQ_NAME: KunlunGPTQConfig, AWQ_NAME: KunlunAWQConfig}
