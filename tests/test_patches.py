"""Each patch in vllm_kunlun.patches must still be needed, and must still work."""

import subprocess
import sys

CHECK = """
import importlib.metadata as m
try:
    m.version("vllm")
    print("vllm distribution found")
except m.PackageNotFoundError:
    print("vllm distribution missing")
from vllm_kunlun.patches import patch_vllm_distribution_name
patch_vllm_distribution_name()
print("patched:", m.version("vllm"))
"""


def test_vllm_cli_still_needs_the_distribution_patch():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    # When this fails, vLLM's CPU build publishes a "vllm" distribution: drop the patch.
    assert "vllm distribution missing" in out
    assert "patched: 0.32" in out and "+cpu" in out


def test_importing_the_plugin_applies_no_patch():
    code = "import importlib.metadata as m, vllm_kunlun.cli, vllm_kunlun.patches; " \
           "print(m.version.__module__)"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    assert out.strip() == "importlib.metadata"


PLANNING_GROUPS = """
import torch
import vllm.distributed.parallel_state as ps
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm_kunlun.patches import planning_parallel_groups

with set_current_vllm_config(VllmConfig()), torch.device("meta"):
    try:
        ColumnParallelLinear(64, 128)
        print("built without groups")
    except AssertionError as error:
        print("needs groups:", error)
    with planning_parallel_groups(2, 2, 1):
        print("pp last rank:", ps.get_pp_group().is_last_rank, ps.get_pp_group().is_first_rank)
        print("column:", tuple(ColumnParallelLinear(64, 128).weight.shape))
        print("row:", tuple(RowParallelLinear(128, 64).weight.shape))
        try:
            ps.get_tp_group().all_reduce
        except AttributeError as error:
            print("communication refused:", "builds models without devices" in str(error))
print("restored:", ps._TP is None and ps._PP is None)
"""


def test_planning_groups_still_needed_and_shard_like_vllm():
    out = subprocess.run([sys.executable, "-c", PLANNING_GROUPS], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    # When the first line fails, vLLM builds layers without process groups: drop the patch.
    assert "needs groups: tensor model parallel group is not initialized" in out
    assert "pp last rank: True False" in out
    assert "column: (64, 64)" in out and "row: (64, 64)" in out  # [out, in] halved by TP 2
    assert "communication refused: True" in out
    assert "restored: True" in out


EXPERT_MAP_LOG = """
import types
import torch
from vllm.model_executor.layers.fused_moe.expert_map_manager import ExpertMapManager
from vllm_kunlun.patches import planning_expert_map_log

meta_map = types.SimpleNamespace(_expert_map=torch.tensor([0, -1, 1, -1], device="meta"),
                                 global_num_experts=4)
try:
    ExpertMapManager.get_compressed_map_string(meta_map)
    print("logs a meta map")
except (NotImplementedError, RuntimeError):
    print("fails on a meta map")
original = ExpertMapManager.get_compressed_map_string
with planning_expert_map_log():
    print("patched:", ExpertMapManager.get_compressed_map_string(meta_map))
print("restored:", ExpertMapManager.get_compressed_map_string is original)
"""


def test_planning_expert_map_log_still_needed():
    out = subprocess.run([sys.executable, "-c", EXPERT_MAP_LOG], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    # When the first line fails, vLLM's log no longer reads the map's values: drop the patch.
    assert "fails on a meta map" in out
    assert "patched: (planned on the meta device)" in out
    assert "restored: True" in out
