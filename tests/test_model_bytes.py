"""vllm_kunlun.model_bytes: the device bytes of a model's weights, against counts by hand."""

import torch
from torch import nn

from vllm_kunlun.model_bytes import device_weight_bytes


class Packed(nn.Module):
    """A linear layer after vLLM's CPU GEMM packed its weight away (an empty parameter and a
    cpu_linear), as vLLM's LinearBase describes its sizes."""

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.output_partition_sizes = [out_features]
        self.input_size_per_partition = in_features
        self.weight = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=torch.float32))  # upcast copy
        self.cpu_linear = torch.nn.functional.linear


def test_counts_each_storage_once_and_packed_layers_at_their_own_size():
    model = nn.Module()
    model.embed = nn.Embedding(10, 4, dtype=torch.bfloat16)
    model.head = nn.Linear(4, 10, bias=False, dtype=torch.bfloat16)
    model.head.weight = model.embed.weight  # tied: one storage
    model.norm = nn.Module()
    model.norm.register_buffer("cache", torch.zeros(6, 2, dtype=torch.float32))
    model.attn = nn.Module()
    model.attn.up = torch.zeros(3, 8, dtype=torch.bfloat16)  # a plain tensor attribute
    model.attn.up_t = model.attn.up.t()  # a view of it: no new bytes
    model.attn.kv_cache = torch.zeros(1000)  # not a weight
    model.proj = Packed(12, 4, torch.bfloat16)
    expected = 10 * 4 * 2 + 6 * 2 * 4 + 3 * 8 * 2 + (12 * 4 + 12) * 2
    assert device_weight_bytes(model) == expected


def test_meta_tensors_count_like_real_ones():
    def build(device: str) -> nn.Module:
        with torch.device(device):
            model = nn.Sequential(nn.Linear(8, 16, dtype=torch.float16), nn.LayerNorm(16))
        model[1].alias = model[0].weight.t()
        return model

    assert device_weight_bytes(build("meta")) == device_weight_bytes(build("cpu"))
    assert device_weight_bytes(build("cpu")) == (8 * 16 + 16) * 2 + 2 * 16 * 4
