"""Plugin loggers live under vLLM's "vllm" logger so they share its handlers and format."""

import logging


def get_logger(component: str) -> logging.Logger:
    from vllm.logger import init_logger

    return init_logger(f"vllm.kunlun.{component}")
