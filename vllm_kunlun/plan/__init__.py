"""`vllm-kunlun plan`: a deployment's memory per device, computed before loading anything.

build.py       the model as vLLM builds it per pipeline stage, on the meta device
figures.py     the activation reserve (an estimate) and vLLM's own KV-cache arithmetic
devices.py     the devices planned for (P800 facts live here, with their sources)
checkpoint.py  a checkpoint's tensors from its safetensors headers
planner.py     the plan, its verdict and the smallest changes that make it fit
cli.py         the command line
"""
