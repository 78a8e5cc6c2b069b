"""Plugin loggers live under vLLM's "vllm" logger so they share its handlers and format.

The kernel layer also runs without vLLM (`vllm-kunlun check-kernels` on a host with torch only):
there the loggers are plain `logging` loggers of the same names.
"""

import logging


def get_logger(component: str) -> logging.Logger:
    name = f"vllm.kunlun.{component}"
    try:
        from vllm.logger import init_logger
    except ImportError:
        return logging.getLogger(name)
    return init_logger(name)
