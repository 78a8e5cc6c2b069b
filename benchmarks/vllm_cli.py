"""vLLM's own CLI, for the in-tree side of a comparison: no plugin device check, no plugin.

The plugin activates only with VLLM_KUNLUN_EMULATE=1 (or a real XPU), so the same command runs
either backend depending on the environment. The one patch (vllm_kunlun.patches) is needed
because vLLM's CPU build cannot start its own CLI otherwise.
"""

import sys

from vllm_kunlun.patches import patch_vllm_distribution_name

if __name__ == "__main__":
    patch_vllm_distribution_name()
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    main()
