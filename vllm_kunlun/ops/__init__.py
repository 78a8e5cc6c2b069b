"""The kernel seam: every device op the plugin runs, one folder per op family.

`ops/<family>/__init__.py` declares the family's ops (vllm_kunlun.ops.declare), and the
family's `reference.py`, `compiled.py` and `kunlun.py` implement them per provider
(vllm_kunlun.ops.provider). Layers and the attention backend call the declared functions, e.g.
`from vllm_kunlun.ops import norm; norm.rms_norm(x, w, eps)`. This package imports torch only,
never vLLM.
"""
