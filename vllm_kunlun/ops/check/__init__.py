"""`vllm-kunlun check-kernels`: every op of the kernel seam, on a chosen provider and torch
device, against the reference kernels on the host in float64, over a fixed case set per op.

Torch and the kernel layer only, never vLLM, so an owner can check a new Kunlun host (or any
accelerator host with torch) before installing vLLM. Each family lists its cases in
`ops/<family>/cases.py`; `cli.py` is the command.
"""
