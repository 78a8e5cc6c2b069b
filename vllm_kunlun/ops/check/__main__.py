import sys

from vllm_kunlun.ops.check.cli import main

sys.exit(main())
