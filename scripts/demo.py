"""`make demo`: serve the default model through the plugin (emulated XPU), ask one question.

Starts `vllm-kunlun serve --emulate` on 127.0.0.1, waits until it answers /health, sends one chat
completion with the `openai` client, prints the reply, and stops the server.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

QUESTION = "What is the capital of France? Answer in one sentence."
STARTUP_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"The server exited with status {server.returncode}; its log:\n"
                     f"{log.read_text()[-4000:]}")  # fmt: skip
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    sys.exit(f"The server did not become healthy in {STARTUP_TIMEOUT_S} s; see {log}")


def main() -> None:
    from openai import OpenAI

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-kunlun-demo-{port}.log"
    command = [
        str(Path(sys.executable).with_name("vllm-kunlun")), "serve", "--emulate",
        "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", "default", "--max-model-len", "2048", "--enforce-eager",
    ]  # fmt: skip
    print(f"==> starting: {' '.join(command[1:])} (log: {log})", flush=True)
    with log.open("w") as log_file:
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
    try:
        wait_until_healthy(url, server, log)
        print("==> server is up; asking:", QUESTION, flush=True)
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        reply = client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": QUESTION}],
            temperature=0,
            max_tokens=64,
        )
        print("==> reply:", reply.choices[0].message.content.strip(), flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        print("==> server stopped", flush=True)


if __name__ == "__main__":
    main()
