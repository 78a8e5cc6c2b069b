"""`make demo`: serve the default model through the plugin (emulated XPU), ask one question.

Starts `vllm-kunlun serve --emulate` on 127.0.0.1, waits until it answers /health, sends one chat
completion with the `openai` client, prints the reply, and stops the server.
"""

import os
import sys
from pathlib import Path

from vllm_kunlun.local_server import LocalServer

QUESTION = "What is the capital of France? Answer in one sentence."


def main() -> None:
    from openai import OpenAI

    command = [
        str(Path(sys.executable).with_name("vllm-kunlun")), "serve", "--emulate",
        "--served-model-name", "default", "--max-model-len", "2048", "--enforce-eager",
    ]  # fmt: skip
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-kunlun-demo-{os.getpid()}.log"
    print(f"==> starting: {' '.join(command[1:])} (log: {log})", flush=True)
    try:
        with LocalServer(command, log, startup_timeout_s=600) as server:
            print("==> server is up; asking:", QUESTION, flush=True)
            client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
            reply = client.chat.completions.create(
                model="default",
                messages=[{"role": "user", "content": QUESTION}],
                temperature=0,
                max_tokens=64,
            )
            print("==> reply:", reply.choices[0].message.content.strip(), flush=True)
    except RuntimeError as error:
        sys.exit(f"==> the demo failed: {error}")
    print("==> server stopped", flush=True)


if __name__ == "__main__":
    main()
