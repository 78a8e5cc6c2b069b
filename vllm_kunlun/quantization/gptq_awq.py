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
KunlunWNA16LinearKernel. Everything else (MoE experts) is refused before start-up by
checkpoint_config.

GPTQ act-order (`desc_act` true): vLLM 0.32 refuses it in `AutoGPTQConfig` (its kernels dropped
`g_idx`), but the plugin's kernel takes an input order. So the plugin's GPTQ config keeps the
flag (vLLM's validation sees it false), its linear method adds a `g_idx` parameter [K] (each
input channel's group) that vLLM's loader fills from the checkpoint, and the kernel turns it
into the load-time sort of the weight's rows and `wna16_gemm`'s input_order
(wna16_linear.py). Tensor parallelism would cut the input channels of row-parallel layers
across groups: checkpoint_config refuses act-order with --tensor-parallel-size above 1.
"""

from typing import TYPE_CHECKING, Any

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
from vllm.model_executor.parameter import RowvLLMParameter

from vllm_kunlun.quantization.checkpoint_config import on_kunlun_platform
from vllm_kunlun.quantization.wna16_linear import GROUP_INDEX_NAME

if TYPE_CHECKING:
    from vllm.model_executor.models.utils import WeightsMapper

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


class GroupIndexParameter(RowvLLMParameter):
    """GPTQ's g_idx [K]: the group of each input channel. A fused layer (qkv, gate_up) has one
    for all its parts, whose checkpoints each carry theirs: they must agree (GPTQ orders the
    channels of projections that share an input alike), which loading checks."""

    def _load_shared(self, loaded_weight: torch.Tensor) -> None:
        loaded = loaded_weight.to(self.data.dtype)
        if getattr(self, "loaded_once", False) and not torch.equal(self.data, loaded):
            raise ValueError(
                "GPTQ act-order: the parts of a fused layer (q/k/v or gate/up) have different "
                "g_idx, which one kernel cannot take; re-quantize with desc_act false"
            )
        self.data.copy_(loaded)
        self.loaded_once = True

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self._load_shared(loaded_weight)

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self._load_shared(loaded_weight)


class KunlunGPTQLinearMethod(AutoGPTQLinearMethod):
    def __init__(self, quant_config: AutoGPTQConfig) -> None:
        # vLLM's __init__ only adds verify_marlin_supported (a CUDA capability check).
        self.quant_config = quant_config
        self.input_dtype = None
        self.quant_type = quant_config.quant_type

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        super().create_weights(
            layer,
            input_size_per_partition,
            output_partition_sizes,
            input_size,
            output_size,
            params_dtype,
            **extra_weight_attrs,
        )
        if not self.quant_config.desc_act:
            return
        if input_size_per_partition != input_size:  # checkpoint_config refuses this first
            raise ValueError("GPTQ act-order needs --tensor-parallel-size 1 on vllm-kunlun")
        group_index = GroupIndexParameter(
            data=torch.full((input_size,), -1, dtype=torch.int32),  # -1: never loaded
            input_dim=0,
            weight_loader=extra_weight_attrs.get("weight_loader"),
        )
        layer.register_parameter(GROUP_INDEX_NAME, group_index)


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
    """GPTQ 4-bit and 8-bit symmetric checkpoints, with or without act-order, through
    KunlunWNA16LinearKernel."""

    NAME, CHECKPOINT_METHOD = GPTQ_NAME, "gptq"

    def __init__(self, weight_bits: int, group_size: int, desc_act: bool, *args, **kwargs):
        # vLLM's validation refuses desc_act (see the module docstring); with one group per
        # output channel act-order changes nothing, as vLLM says too.
        super().__init__(weight_bits, group_size, False, *args, **kwargs)
        self.desc_act = bool(desc_act) and group_size != -1
        if self.desc_act:
            # g_idx is loaded where a layer has one, and ignored where it has none (a layer
            # left unquantized), instead of being dropped from every checkpoint as vLLM does.
            self._ignore_unexpected_suffixes = (*self._ignore_unexpected_suffixes, ".g_idx")

    def get_checkpoint_weight_mapper(self) -> "WeightsMapper":
        """vLLM's mapper drops every `.g_idx`; act-order needs them."""
        from vllm.model_executor.models.utils import WeightsMapper

        return WeightsMapper() if self.desc_act else super().get_checkpoint_weight_mapper()

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
