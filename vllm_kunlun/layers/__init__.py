"""vLLM layers whose forward the plugin owns, registered with CustomOp.register_oot.

vLLM instantiates these in place of its own classes (matched by class name). Both `forward_oot`
(the dispatch for an out-of-tree platform) and `forward_cpu` (taken first on the emulated
platform, which answers is_cpu()) call the plugin's ops, so vLLM's in-tree CPU kernels never
run for these layers. Each plugin class names the ops it calls in `plugin_ops`, which the route
report (vllm_kunlun.routes) shows.

`OOT_LAYERS` maps vLLM's class name to the plugin class; the platform enables those names as
custom ops under torch.compile. One entry is not a layer but the method a layer runs: vLLM's
MoE experts (`RoutedExperts`) run their quantization method, and for unquantized weights that is
the CustomOp `UnquantizedFusedMoEMethod`, which the plugin replaces (layers/moe.py).
"""

from vllm.model_executor.custom_op import CustomOp

from vllm_kunlun.layers.activation import KunlunGeluAndMul, KunlunSiluAndMul
from vllm_kunlun.layers.moe import KunlunUnquantizedFusedMoEMethod
from vllm_kunlun.layers.norm import KunlunGemmaRMSNorm, KunlunRMSNorm
from vllm_kunlun.layers.rotary import ROTARY_LAYERS, KunlunRotaryEmbedding

OOT_LAYERS: dict[str, type[CustomOp]] = {
    "RMSNorm": KunlunRMSNorm,
    "GemmaRMSNorm": KunlunGemmaRMSNorm,
    "SiluAndMul": KunlunSiluAndMul,
    "GeluAndMul": KunlunGeluAndMul,
    **ROTARY_LAYERS,
    "UnquantizedFusedMoEMethod": KunlunUnquantizedFusedMoEMethod,
}


def register_layers() -> None:
    """Register the plugin layers with vLLM; safe to call more than once."""
    from vllm.model_executor.custom_op import op_registry_oot

    for vllm_name, layer_cls in OOT_LAYERS.items():
        if op_registry_oot.get(vllm_name) is not layer_cls:
            CustomOp.register_oot(_decorated_op_cls=layer_cls, name=vllm_name)


__all__ = ["OOT_LAYERS", "KunlunRotaryEmbedding", "register_layers"]
