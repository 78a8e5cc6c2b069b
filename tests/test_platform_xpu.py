"""The Kunlun XPU platform, on a CPU-only machine: a faked XPU runtime, real vLLM configs.

The platform needs a Kunlun XPU; these tests are what verifies it here. vLLM picks its platform
once per process, so the configs are built in a subprocess (tests/platform_xpu_probe.py) that
fakes an 8-XPU host with 96 GiB per XPU and lets vLLM select the platform through the plugin's
entry point. The probe fails loudly if torch.cuda or psutil's host-memory query is called.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.engine import REPO
from tests.platform_xpu_probe import ALLOCATED_BYTES, DEVICES, FREE_BYTES, HBM_BYTES

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
    "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 16,
    "num_key_value_heads": 16, "head_dim": 16, "vocab_size": 1024,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "torch_dtype": "bfloat16", "tie_word_embeddings": False,
}  # fmt: skip

ATTENTION_OP = "vllm::unified_attention_with_output"

#: What vLLM's CpuPlatform.check_and_update_config sets in the environment.
CPU_PLATFORM_VARIABLES = {
    "LD_PRELOAD", "VLLM_WORKER_MULTIPROC_METHOD", "NUMEXPR_MAX_THREADS",
    "TORCHINDUCTOR_COMPILE_THREADS", "VLLM_DISABLE_SHARED_EXPERTS_STREAM",
    "TORCHINDUCTOR_CPP_DYNAMIC_THREADS", "VLLM_SSM_CONV_STATE_LAYOUT", "LOCAL_WORLD_SIZE",
}  # fmt: skip


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    model = tmp_path_factory.mktemp("tiny-llama-config")
    (model / "config.json").write_text(json.dumps(TINY_LLAMA))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_KUNLUN", "XPU_"))}
    env.pop("VLLM_TARGET_DEVICE", None)
    proc = subprocess.run([sys.executable, "-m", "tests.platform_xpu_probe", str(model)],
                          cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-6000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.fixture(scope="module")
def facts(probe) -> dict:
    return probe["facts"]


@pytest.fixture(scope="module")
def configs(probe) -> dict:
    return probe["configs"]


# Selection --------------------------------------------------------------------------------------


def test_register_names_the_xpu_platform_when_an_xpu_runtime_is_found(monkeypatch):
    import vllm_kunlun
    from vllm_kunlun import device

    monkeypatch.setattr(device, "runtime_present", lambda: True)
    monkeypatch.setenv("VLLM_KUNLUN_EMULATE", "1")  # a real XPU wins over emulation
    assert vllm_kunlun.register() == vllm_kunlun.XPU_PLATFORM_PATH
    assert device.XpuRuntime.platform_cls == vllm_kunlun.XPU_PLATFORM_PATH


def test_the_xpu_platform_builds_on_vllms_platform_not_on_its_cpu_platform():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.platforms.interface import Platform

    from vllm_kunlun.platform import KunlunPlatform, KunlunPlatformBase

    assert KunlunPlatform.__mro__[1:] == (KunlunPlatformBase, Platform, object)
    assert not issubclass(KunlunPlatform, CpuPlatform)


def test_the_xpu_platform_refuses_an_emulated_runtime(monkeypatch):
    from vllm_kunlun.device import EmulatedRuntime
    from vllm_kunlun.platform import KunlunPlatform, xpu

    monkeypatch.setattr(xpu, "current_runtime", EmulatedRuntime)
    with pytest.raises(RuntimeError, match="EmulatedKunlunPlatform"):
        KunlunPlatform.device_count()


def test_vllm_selects_the_xpu_platform_and_the_plugin_ops_activate(probe, facts):
    assert facts["class"] == "vllm_kunlun.platform.xpu.KunlunPlatform"
    assert facts["runtime_is_fake"]
    assert probe["ops_registered"]


# Device facts -----------------------------------------------------------------------------------


def test_device_facts_are_those_of_an_xpu_under_xpytorch(facts):
    assert (facts["device_type"], facts["device_name"], facts["dispatch_key"]) == (
        "cuda", "cuda", "CUDA",
    )  # fmt: skip
    assert (facts["dist_backend"], facts["ray_device_key"]) == ("nccl", "GPU")
    assert facts["device_control_env_var"] == "XPU_VISIBLE_DEVICES"
    assert facts["device_name_reported"] == "Kunlun P800"
    assert facts["is_out_of_tree"]
    assert not (facts["is_cpu"] or facts["is_cuda"] or facts["is_cuda_alike"])
    assert not (facts["is_sleep_mode_available"] or facts["is_cumem_allocator_available"])


def test_devices_and_memory_come_from_the_runtime_not_the_host(probe, facts):
    assert facts["device_count"] == DEVICES
    assert probe["visible_device_count"] == 2  # XPU_VISIBLE_DEVICES=0,3
    assert facts["total_memory"] == HBM_BYTES
    assert facts["free_memory"] == FREE_BYTES
    assert facts["current_memory_usage"] == ALLOCATED_BYTES
    assert facts["set_device_reached_runtime"]
    assert facts["seeding_is_reproducible"]


def test_backend_communicator_and_graph_hooks(facts):
    from vllm_kunlun.attention import BACKEND_PATH

    assert facts["attn_backend"] == BACKEND_PATH
    assert facts["communicator"] == "vllm_kunlun.distributed.communicator.KunlunCommunicator"
    assert facts["static_graph_wrapper"] == "vllm.compilation.cuda_graph.CUDAGraphWrapper"
    assert facts["support_static_graph_mode"] and facts["opaque_attention_op"]
    assert facts["simple_compile_backend"] == "eager"


# check_and_update_config ------------------------------------------------------------------------


def test_default_config_compiles_eagerly_with_piecewise_graphs(configs):
    from vllm_kunlun.layers import OOT_LAYERS

    config = configs["default"]
    assert config["device_type"] == "cuda"
    assert config["worker_cls"] == "vllm_kunlun.worker.xpu.KunlunWorker"
    assert config["block_size"] == 64
    assert (config["compile_mode"], config["backend"]) == ("VLLM_COMPILE", "eager")
    assert config["cudagraph_mode"] == "PIECEWISE" and config["capture_sizes"]
    assert ATTENTION_OP in config["splitting_ops"]
    assert "all" in config["custom_ops"] and "none" not in config["custom_ops"]
    assert {f"+{name}" for name in OOT_LAYERS} <= set(config["custom_ops"])
    assert config["fusions_on"] == []
    assert config["async_scheduling"]  # not turned off as on vLLM's CPU platform


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("full", "PIECEWISE"),
        ("full_decode_only", "PIECEWISE"),
        ("full_and_piecewise", "PIECEWISE"),
        # Piecewise graphs need vLLM's compiled, split graph: without it there are none.
        ("no_compile_full", "NONE"),
    ],
)
def test_full_graphs_become_piecewise(configs, case, expected):
    assert configs[case]["cudagraph_mode"] == expected
    assert any("piecewise graphs only" in w for w in configs[case]["warnings"])


def test_piecewise_is_the_default_without_a_warning(configs):
    assert configs["default"]["warnings"] == []


def test_enforce_eager_captures_no_graphs(configs):
    config = configs["enforce_eager"]
    assert (config["cudagraph_mode"], config["compile_mode"]) == ("NONE", "NONE")
    assert config["capture_sizes"] == []


def test_inductor_and_disabled_custom_ops_are_replaced(configs):
    assert configs["inductor"]["backend"] == "eager"
    assert "none" not in configs["inductor"]["custom_ops"]
    custom_ops = configs["custom_ops_none"]["custom_ops"]
    assert "all" in custom_ops and "none" not in custom_ops


def test_a_users_splitting_ops_keep_attention_out_of_the_graphs(configs):
    config = configs["empty_splitting_ops"]
    assert config["splitting_ops"] == [ATTENTION_OP, "vllm::unified_mla_attention_with_output"]
    assert config["cudagraph_mode"] == "PIECEWISE"


def test_block_size_is_validated(configs):
    assert configs["block_size_128"]["block_size"] == 128
    assert "--block-size 24 is not supported on Kunlun" in configs["block_size_24"]["error"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("lora", "LoRA adapters are not supported on Kunlun XPUs yet (--enable-lora)"),
        ("quantization", "vllm-kunlun cannot run --quantization fp8"),
        ("kv_cache_fp8", "--kv-cache-dtype fp8 is not supported by vllm-kunlun"),
        ("tp_16", "needs 16 Kunlun XPUs on this host, one per worker, but only 8 are visible"),
        ("pcp_2", "--prefill-context-parallel-size 2 is not supported by vllm-kunlun yet"),
    ],
)
def test_unsupported_options_are_refused_with_what_to_do(configs, case, message):
    assert message in configs[case]["error"]


def test_lora_refusal_says_what_to_do_instead(configs, facts):
    assert "merge_and_unload" in configs["lora"]["error"]
    assert facts["punica_refusal"].startswith("NotImplementedError: LoRA adapters")


def test_mla_models_get_the_plugins_mla_backend_and_prefill_backend(facts):
    assert facts["mla_backend"] == "vllm_kunlun.attention.mla.KunlunMLABackend"
    assert facts["mla_prefill_backend"] == "KUNLUN_MLA_PREFILL"


def test_other_refusals(facts):
    assert "DeepSeek-V3.2's top-k indexer" in facts["sparse_refusal"]
    assert "serve an unquantized checkpoint" in facts["quantization_refusal"]
    assert "not torch.float64" in facts["dtype_refusal"]


def test_no_cpu_platform_settings_leak_into_the_environment(probe):
    changed = set(probe["env_changed_by_configs"])
    assert not changed & CPU_PLATFORM_VARIABLES, changed
    assert not [name for name in changed if name.startswith(("VLLM_CPU_", "OMP_", "KMP_"))]
    assert probe["ld_preload_unchanged"]
