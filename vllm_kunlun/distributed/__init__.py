"""Collectives between Kunlun devices (vLLM's device-communicator seam)."""

COMMUNICATOR_PATH = "vllm_kunlun.distributed.communicator.KunlunCommunicator"
