"""Rotary position embeddings through the plugin's rotary op, for every rotary class of vLLM.

vLLM picks a rotary class per `rope_type` (`get_rope`), and `CustomOp.register_oot` replaces a
class only by its exact name: each class the plugin routes needs a plugin class of its own.
The op rotates token t by row `positions[t]` of a cos/sin cache `[positions, rotary_dim]` =
`[cos | sin]`; what differs between vLLM's classes is how they fill that cache and which rows
they read:

- Classes that only build a different cache (Llama 3, YaRN, linear, NTK, dynamic NTK, Gemma 4
  proportional): the plugin class is generated from the vLLM class with `KunlunRotaryEmbedding`'s
  forward (`ROUTED_BY_CACHE`).
- DeepSeek scaling: the rows are `positions + offsets`, and each tensor's last dimension is one
  head.
- M-RoPE (Qwen2-VL and its interleaved, Ernie 4.5-VL, Bailing and openPangu variants): with
  positions `[k, T]`, frequency channel c of token t reads the cache row of position row
  `axis[c]`. The layer gathers those per-token rows in plain torch and the op rotates token t by
  row t of that per-token cache.

`REFUSED_ROTARY` names the classes whose math the op does not cover; the route report
(vllm_kunlun.routes) refuses a model that builds one, with the reason given there.
"""

import torch
from vllm.model_executor.custom_op import CustomOp
from vllm.model_executor.layers.rotary_embedding import (
    BailingMRotaryEmbedding,
    DeepseekScalingRotaryEmbedding,
    DynamicNTKAlphaRotaryEmbedding,
    DynamicNTKScalingRotaryEmbedding,
    Gemma4RotaryEmbedding,
    LinearScalingRotaryEmbedding,
    Llama3RotaryEmbedding,
    MRotaryEmbedding,
    MRotaryEmbeddingInterleaved,
    NTKScalingRotaryEmbedding,
    YaRNScalingRotaryEmbedding,
)
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
from vllm.model_executor.layers.rotary_embedding.ernie45_vl_rope import (
    Ernie4_5_VLRotaryEmbedding,
)

from vllm_kunlun.ops import rotary

PLUGIN_OPS = ("rotary_embedding",)


class KunlunRotaryEmbedding(RotaryEmbedding):
    plugin_ops = PLUGIN_OPS

    def forward_oot(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cos_sin_cache = self._match_cos_sin_cache_dtype(query)
        rotary.rotary_embedding(
            positions, query, key, self.head_size, cos_sin_cache, self.is_neox_style
        )
        return query, key

    forward_cpu = forward_oot


#: vLLM classes whose forward is RotaryEmbedding's: only their cos/sin cache differs.
ROUTED_BY_CACHE: tuple[type[RotaryEmbedding], ...] = (
    Llama3RotaryEmbedding,
    YaRNScalingRotaryEmbedding,
    LinearScalingRotaryEmbedding,
    NTKScalingRotaryEmbedding,
    DynamicNTKScalingRotaryEmbedding,
    DynamicNTKAlphaRotaryEmbedding,
    Gemma4RotaryEmbedding,
)


def _with_plugin_forward(vllm_cls: type[RotaryEmbedding]) -> type[RotaryEmbedding]:
    """`Kunlun<name>`: vLLM's class, its cache untouched, rotated by the plugin's op."""
    name = f"Kunlun{vllm_cls.__name__}"
    forward = KunlunRotaryEmbedding.forward_oot
    namespace = {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"vLLM's {vllm_cls.__name__} cache, rotated by the plugin's rotary op.",
        "plugin_ops": PLUGIN_OPS,
        "forward_oot": forward,
        "forward_cpu": forward,
    }
    return type(name, (vllm_cls,), namespace)


CACHE_ROUTED_LAYERS: dict[str, type[CustomOp]] = {
    cls.__name__: _with_plugin_forward(cls) for cls in ROUTED_BY_CACHE
}


def _dense(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_contiguous() else x.contiguous()


class KunlunDeepseekScalingRotaryEmbedding(DeepseekScalingRotaryEmbedding):
    """DeepSeek YaRN: rows at positions + offsets; the last dimension of query and key is one
    head (MLA passes q_pe [T, H, rope_dim] and k_pe [T, 1, rope_dim]). Rotates contiguous
    inputs in place and returns contiguous copies of the others."""

    plugin_ops = PLUGIN_OPS

    def forward_oot(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if key is None:
            raise ValueError("DeepSeek scaling rotary embedding needs a key tensor")
        if offsets is not None:
            positions = positions + offsets
        cos_sin_cache = self._match_cos_sin_cache_dtype(query)
        query, key = _dense(query), _dense(key)
        if query.shape[-1] == key.shape[-1]:
            rotary.rotary_embedding(
                positions, query, key, query.shape[-1], cos_sin_cache, self.is_neox_style
            )
        else:
            for x in (query, key):
                rotary.rotary_embedding(
                    positions, x, None, x.shape[-1], cos_sin_cache, self.is_neox_style
                )
        return query, key

    forward_cpu = forward_oot


class _RotaryByPositionRows:
    """M-RoPE through the rotary op. With positions [k, T], frequency channel c of token t is
    turned by position `positions[axis[c], t]`; `_channel_axes()` gives axis (rotary_dim / 2
    entries, the same for the cos and the sin half). The layer gathers each token's cos/sin row
    in plain torch, and the op rotates token t by row t of that per-token cache. 1-D positions
    (text only) read the cache directly."""

    plugin_ops = PLUGIN_OPS
    channel_axes: torch.Tensor | None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        axes = self._channel_axes() if self.mrope_section else None
        if axes is not None and len(axes) != self.rotary_dim // 2:
            raise ValueError(
                f"{type(self).__name__}: {len(axes)} channel axes for rotary_dim {self.rotary_dim}"
            )
        # A plain attribute, not a buffer: no checkpoint or state dict should ever see it.
        self.channel_axes = None if axes is None else torch.tensor(axes + axes, dtype=torch.long)

    def _channel_axes(self) -> list[int]:
        raise NotImplementedError

    def rows_per_token(self, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
        """[T, rotary_dim]: token t's cos/sin, each channel read at its own position row."""
        rows = cos_sin_cache[positions.long()]  # [k, T, rotary_dim]
        if self.channel_axes.device != rows.device:
            self.channel_axes = self.channel_axes.to(rows.device)
        axes = self.channel_axes.expand(1, rows.shape[1], -1)
        return rows.gather(0, axes).squeeze(0)

    def forward_oot(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cos_sin_cache = self._match_cos_sin_cache_dtype(query)
        if positions.ndim == 2:
            if self.channel_axes is None:
                raise ValueError(f"{type(self).__name__}: [k, T] positions without mrope_section")
            cos_sin_cache = self.rows_per_token(positions, cos_sin_cache)
            positions = torch.arange(positions.shape[-1], device=positions.device)
        rotary.rotary_embedding(
            positions, query, key, self.head_size, cos_sin_cache, self.is_neox_style
        )
        return query, key

    forward_cpu = forward_oot


class KunlunMRotaryEmbedding(_RotaryByPositionRows, MRotaryEmbedding):
    """Qwen2-VL sections (t, h, w consecutive channels) or, with mrope_interleaved, Qwen3-VL's
    interleaving (channel c reads h when c % 3 == 1 and w when c % 3 == 2, within 3 * section)."""

    def _channel_axes(self) -> list[int]:
        if not self.mrope_interleaved:
            return [axis for axis, size in enumerate(self.mrope_section) for _ in range(size)]
        _, height, width = self.mrope_section
        axes = []
        for c in range(self.rotary_dim // 2):
            if c % 3 == 1 and c < 3 * height:
                axes.append(1)
            elif c % 3 == 2 and c < 3 * width:
                axes.append(2)
            else:
                axes.append(0)
        return axes


class KunlunErnie4_5_VLRotaryEmbedding(_RotaryByPositionRows, Ernie4_5_VLRotaryEmbedding):
    """Ernie 4.5-VL, sections (h, w, t): h and w alternate over the first h + w channels, then
    t."""

    def _channel_axes(self) -> list[int]:
        height, width, time = self.mrope_section
        return [1 if c % 2 == 0 else 2 for c in range(height + width)] + [0] * time


class KunlunBailingMRotaryEmbedding(_RotaryByPositionRows, BailingMRotaryEmbedding):
    """Bailing: h and w alternate over the first spatial_size channels, t after them."""

    def _channel_axes(self) -> list[int]:
        spatial = [1 if c % 2 == 0 else 2 for c in range(self.spatial_size)]
        return spatial + [0] * (self.rotary_dim // 2 - self.spatial_size)


class KunlunMRotaryEmbeddingInterleaved(_RotaryByPositionRows, MRotaryEmbeddingInterleaved):
    """openPangu: vLLM overrides `forward` itself, with the channel order in `mrope_dim`. The
    plugin class dispatches like any CustomOp again, and its torch-native forward is vLLM's."""

    forward = CustomOp.forward
    forward_native = MRotaryEmbeddingInterleaved.forward

    def _channel_axes(self) -> list[int]:
        return list(self.mrope_dim[: self.rotary_dim // 2])


ROTARY_LAYERS: dict[str, type[CustomOp]] = {
    "RotaryEmbedding": KunlunRotaryEmbedding,
    **CACHE_ROUTED_LAYERS,
    "DeepseekScalingRotaryEmbedding": KunlunDeepseekScalingRotaryEmbedding,
    "MRotaryEmbedding": KunlunMRotaryEmbedding,
    "MRotaryEmbeddingInterleaved": KunlunMRotaryEmbeddingInterleaved,
    "Ernie4_5_VLRotaryEmbedding": KunlunErnie4_5_VLRotaryEmbedding,
    "BailingMRotaryEmbedding": KunlunBailingMRotaryEmbedding,
}

#: vLLM rotary classes the plugin does not route: class name -> (why, what to use instead).
REFUSED_ROTARY: dict[str, tuple[str, str]] = {
    "DeepseekV4ScalingRotaryEmbedding": (
        "rotates the last rotary_dim features of a head, optionally inverted, from a float32 "
        "cache: not the rotary op's contract",
        "a model with standard or DeepSeek YaRN rotary (DeepSeek-V4 also needs MLA, which the "
        "plugin does not support yet)",
    ),
    "DualChunkRotaryEmbedding": (
        "dual-chunk attention rotates every query five ways for vLLM's dual-chunk attention "
        "backend, which the plugin does not have",
        "the same model without dual_chunk_attention_config (a shorter context)",
    ),
    "FourierRotaryEmbedding": (
        "Fourier RoPE mixes frequencies with learned per-KV-head coefficients; the rotary op "
        "takes one cos/sin row per token",
        "a model with standard rotary embeddings",
    ),
    "Llama4VisionRotaryEmbedding": (
        "the complex-valued 2-D patch rotary of Llama 4's vision tower",
        "a text-only model (vision towers are not supported yet)",
    ),
    "Phi3LongRoPEScaledRotaryEmbedding": (
        "LongRoPE (rope_type 'longrope') is a plain nn.Module in vLLM, not a CustomOp, so "
        "CustomOp.register_oot cannot route it to the plugin's rotary op",
        "a checkpoint with default rotary, e.g. Phi-3-mini-4k-instruct instead of the 128k one",
    ),
}
