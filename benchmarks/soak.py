"""`make soak`: load, client hang-ups and bad input against the plugin's OpenAI server.

    python -m benchmarks.soak                  # 300 requests, up to 32 at once
    python -m benchmarks.soak --requests 40 --concurrency 8    # the size `make test` runs

Starts `vllm-kunlun serve --emulate` (default model, float32) on 127.0.0.1 with a KV cache too
small for the load, so the scheduler must preempt. Sends a seeded mix of chat and completion
requests, streaming and not, with prompts of 10 to 1,500 tokens; cancels 10% of the streams
part-way; makes 5% of the requests invalid. Then checks /health, a fresh request, and that
greedy requests give the same text when sent again alone. Prints a table, writes
results/soak-<time>.json, and exits 1 if a check fails. Every loop is bounded in count and time.
"""

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from vllm_kunlun.local_server import LocalServer

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "default"
MAX_MODEL_LEN = 2048
# 34 blocks of 64 tokens (one is vLLM's null block): room for one max-length request, far
# too little for the load.
KV_BLOCKS = 34
REQUEST_TIMEOUT_S = 600
INVALID_KINDS = ("malformed_json", "negative_max_tokens", "unknown_model", "prompt_too_long",
                 "bad_schema", "wrong_type")  # fmt: skip
WORDS = ("kunlun", "accelerator", "serves", "language", "models", "with", "paged", "attention",
         "while", "the", "scheduler", "batches", "requests", "from", "many", "clients", "across",
         "data", "centre", "every", "night", "and", "day")  # fmt: skip


@dataclass
class Request:
    index: int
    kind: str  # "chat" | "completion" | one of INVALID_KINDS
    stream: bool = False
    prompt_tokens: int = 0
    max_tokens: int = 16
    greedy: bool = True
    cancel_after: int | None = None  # chunks to read before hanging up


@dataclass
class Outcome:
    request: Request
    status: str  # completed | cancelled | rejected | server_error | timeout | failed
    http_status: int | None = None
    text: str = ""
    tokens: int = 0
    message: str = ""


@dataclass
class Summary:
    sent: int = 0
    completed: int = 0
    cancelled: int = 0
    rejected_4xx: int = 0
    rejected_codes: dict[str, int] = field(default_factory=dict)
    invalid_without_4xx: int = 0
    server_errors_5xx: int = 0
    timeouts: int = 0
    other_failures: int = 0
    tokens_generated: int = 0
    preemptions: float = 0.0
    health_after: bool = False
    fresh_request_after: bool = False
    greedy_rechecked: int = 0
    greedy_mismatches: int = 0
    wall_s: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def plan(count: int, seed: int) -> list[Request]:
    """A seeded request mix: 5% invalid, the rest chat/completion, stream or not."""
    rng = random.Random(seed)
    requests = []
    num_invalid = max(len(INVALID_KINDS), round(count * 0.05))
    invalid_slots = set(rng.sample(range(count), num_invalid))
    invalid_kinds = iter(INVALID_KINDS * (num_invalid // len(INVALID_KINDS) + 1))
    for index in range(count):
        if index in invalid_slots:
            requests.append(Request(index, next(invalid_kinds)))
            continue
        short = rng.random() < 0.6
        request = Request(
            index,
            kind=rng.choice(("chat", "completion")),
            stream=rng.random() < 0.5,
            prompt_tokens=rng.randint(10, 200) if short else rng.randint(200, 1500),
            max_tokens=rng.randint(4, 160),
            greedy=rng.random() < 0.5,
        )
        if request.stream and rng.random() < 0.2:  # 20% of streams ~ 10% of all requests
            request.cancel_after = rng.randint(1, 3)
            request.max_tokens = max(request.max_tokens, 32)
        requests.append(request)
    return requests


class PromptMaker:
    """Text of an exact token count under the served model's tokenizer."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        rng = random.Random(0)
        text = " ".join(rng.choice(WORDS) for _ in range(4000))
        self.ids = self.tokenizer(text, add_special_tokens=False).input_ids

    def text(self, tokens: int, index: int) -> str:
        start = (index * 37) % 500
        return self.tokenizer.decode(self.ids[start : start + tokens])


def body_for(request: Request, prompts: PromptMaker) -> dict:
    prompt = prompts.text(request.prompt_tokens, request.index)
    body: dict = {"model": MODEL_NAME, "max_tokens": request.max_tokens, "stream": request.stream}
    if request.greedy:
        body["temperature"] = 0
    else:
        body |= {"temperature": 0.8, "top_p": 0.95, "seed": request.index}
    if request.kind == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def invalid_call(request: Request, prompts: PromptMaker) -> tuple[str, dict | str]:
    """(path, body) of an invalid request; a str body is sent as raw, broken JSON."""
    base = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 8}
    kind = request.kind
    if kind == "malformed_json":
        return "/v1/completions", '{"model": "default", "prompt": "Hello", "max_tokens": 8'
    if kind == "negative_max_tokens":
        return "/v1/completions", base | {"max_tokens": -5}
    if kind == "unknown_model":
        return "/v1/completions", base | {"model": "no-such-model"}
    if kind == "prompt_too_long":
        return "/v1/completions", base | {"prompt": prompts.text(MAX_MODEL_LEN + 200, 0)}
    if kind == "bad_schema":
        schema = {"type": "object", "properties": {"x": {"type": "no-such-type"}}}
        fmt = {"type": "json_schema", "json_schema": {"name": "broken", "schema": schema}}
        return "/v1/chat/completions", {
            "model": MODEL_NAME, "max_tokens": 8, "response_format": fmt,
            "messages": [{"role": "user", "content": "Give me JSON."}],
        }  # fmt: skip
    if kind == "wrong_type":
        return "/v1/completions", base | {"max_tokens": "eight", "temperature": "warm"}
    raise ValueError(f"unknown invalid request kind {kind!r}")


async def send(client: httpx.AsyncClient, request: Request, prompts: PromptMaker) -> Outcome:
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            if request.kind in INVALID_KINDS:
                return await _send_invalid(client, request, prompts)
            return await _send_valid(client, request, prompts)
    except TimeoutError:
        return Outcome(request, "timeout", message=f"no answer in {REQUEST_TIMEOUT_S} s")
    except httpx.HTTPError as error:
        return Outcome(request, "failed", message=f"{type(error).__name__}: {error}")


async def _send_invalid(client: httpx.AsyncClient, request: Request, prompts) -> Outcome:
    path, body = invalid_call(request, prompts)
    if isinstance(body, str):
        headers = {"Content-Type": "application/json"}
        response = await client.post(path, content=body, headers=headers)
    else:
        response = await client.post(path, json=body)
    return _status_outcome(request, response)


def _status_outcome(request: Request, response: httpx.Response) -> Outcome:
    code = response.status_code
    status = "rejected" if 400 <= code < 500 else "server_error" if code >= 500 else "failed"
    return Outcome(request, status, code, message=response.text[:300])


async def _send_valid(client: httpx.AsyncClient, request: Request, prompts) -> Outcome:
    path = "/v1/chat/completions" if request.kind == "chat" else "/v1/completions"
    body = body_for(request, prompts)
    if not request.stream:
        response = await client.post(path, json=body)
        if response.status_code != 200:
            return _status_outcome(request, response)
        data = response.json()
        choice = data["choices"][0]
        text = choice["message"]["content"] if request.kind == "chat" else choice["text"]
        return Outcome(request, "completed", 200, text, data["usage"]["completion_tokens"])
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return _status_outcome(request, response)
        pieces, chunks = [], 0
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunks += 1
            delta = json.loads(line[len("data: ") :])["choices"]
            if delta:
                piece = delta[0].get("delta", {}).get("content") or delta[0].get("text") or ""
                pieces.append(piece)
            if request.cancel_after is not None and chunks >= request.cancel_after:
                return Outcome(request, "cancelled", 200, "".join(pieces), chunks)
        return Outcome(request, "completed", 200, "".join(pieces), chunks)


async def drive(url: str, requests: list[Request], concurrency: int, prompts) -> list[Outcome]:
    limit = asyncio.Semaphore(concurrency)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=30)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def one(request: Request) -> Outcome:
            async with limit:
                return await send(client, request, prompts)

        return list(await asyncio.gather(*(one(r) for r in requests)))


def summarize(outcomes: list[Outcome]) -> Summary:
    summary = Summary(sent=len(outcomes))
    codes: Counter[str] = Counter()
    for outcome in outcomes:
        invalid = outcome.request.kind in INVALID_KINDS
        if outcome.status == "completed":
            summary.completed += 1
            summary.tokens_generated += outcome.tokens
        elif outcome.status == "cancelled":
            summary.cancelled += 1
        elif outcome.status == "rejected":
            summary.rejected_4xx += 1
            codes[str(outcome.http_status)] += 1
        elif outcome.status == "server_error":
            summary.server_errors_5xx += 1
        elif outcome.status == "timeout":
            summary.timeouts += 1
        else:
            summary.other_failures += 1
        if invalid and outcome.status != "rejected":
            summary.invalid_without_4xx += 1
            summary.failures.append(f"invalid {outcome.request.kind} got {outcome.status}")
        if invalid and outcome.status == "rejected" and not outcome.message:
            summary.failures.append(f"invalid {outcome.request.kind}: 4xx without a message")
        if not invalid and outcome.status not in ("completed", "cancelled"):
            summary.failures.append(
                f"request {outcome.request.index} ({outcome.request.kind}) {outcome.status} "
                f"{outcome.http_status}: {outcome.message[:200]}"
            )
    summary.rejected_codes = dict(sorted(codes.items()))
    return summary


def metric(url: str, name: str) -> float:
    """Sum of a Prometheus counter/gauge over its label sets, from the server's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


async def recheck_greedy(url: str, outcomes: list[Outcome], prompts, limit: int) -> list[str]:
    """Greedy requests sent again one at a time must give the same text as under load."""
    greedy = [o for o in outcomes if o.status == "completed" and o.request.greedy]
    mismatches = []
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        for outcome in greedy[:limit]:
            again = await send(client, outcome.request, prompts)
            if again.text != outcome.text:
                mismatches.append(
                    f"request {outcome.request.index}: under load {outcome.text!r} "
                    f"alone {again.text!r}"
                )
    return mismatches


def server_command(max_num_seqs: int) -> list[str]:
    return [
        str(Path(sys.executable).with_name("vllm-kunlun")), "serve", "--emulate",
        "--served-model-name", MODEL_NAME, "--dtype", "float32", "--enforce-eager",
        "--max-model-len", str(MAX_MODEL_LEN), "--num-gpu-blocks-override", str(KV_BLOCKS),
        "--max-num-seqs", str(max_num_seqs), "--seed", "0",
    ]  # fmt: skip


def run_soak(requests: int, concurrency: int, seed: int, recheck: int, workdir: Path) -> Summary:
    from vllm_kunlun.model_zoo.default_model import prepare_default_model

    prompts = PromptMaker(prepare_default_model())
    mix = plan(requests, seed)
    log = workdir / "soak-server.log"
    print(f"==> starting the server (log: {log})", flush=True)
    with LocalServer(server_command(concurrency), log, startup_timeout_s=600) as server:
        print(f"==> sending {requests} requests, up to {concurrency} at once", flush=True)
        started = time.monotonic()
        outcomes = asyncio.run(drive(server.url, mix, concurrency, prompts))
        summary = summarize(outcomes)
        summary.wall_s = round(time.monotonic() - started, 1)
        summary.preemptions = metric(server.url, "vllm:num_preemptions_total")
        summary.health_after = httpx.get(f"{server.url}/health", timeout=30).status_code == 200
        fresh = asyncio.run(_fresh_request(server.url, prompts))
        summary.fresh_request_after = fresh.status == "completed" and bool(fresh.text)
        print(f"==> re-sending up to {recheck} greedy requests one at a time", flush=True)
        mismatches = asyncio.run(recheck_greedy(server.url, outcomes, prompts, recheck))
    greedy_done = [o for o in outcomes if o.status == "completed" and o.request.greedy]
    summary.greedy_rechecked = min(recheck, len(greedy_done))
    summary.greedy_mismatches = len(mismatches)
    summary.failures += mismatches
    if summary.timeouts:
        summary.failures.append(f"{summary.timeouts} timeouts")
    if summary.preemptions <= 0:
        summary.failures.append("the KV cache never forced a preemption")
    if not summary.health_after:
        summary.failures.append("/health did not answer 200 after the load")
    if not summary.fresh_request_after:
        summary.failures.append(f"a fresh request after the load failed: {fresh.message}")
    if summary.greedy_rechecked == 0:
        summary.failures.append("no greedy request completed, so none could be re-checked")
    return summary


async def _fresh_request(url: str, prompts: PromptMaker) -> Outcome:
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        return await send(client, Request(-1, "chat", prompt_tokens=12, max_tokens=8), prompts)


def table(summary: Summary) -> str:
    rows = [(key, value) for key, value in asdict(summary).items() if key != "failures"]
    rows.append(("verdict", "PASS" if summary.passed else "FAIL"))
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recheck", type=int, default=20, help="greedy requests to re-send")
    parser.add_argument("--out", type=Path, default=REPO / "results")
    args = parser.parse_args(argv)
    if args.requests < len(INVALID_KINDS) * 2 or args.concurrency < 1:
        parser.error(f"--requests must be at least {len(INVALID_KINDS) * 2}, --concurrency >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = run_soak(args.requests, args.concurrency, args.seed, args.recheck, args.out)
    print(table(summary))
    for failure in summary.failures:
        print("FAIL:", failure)
    path = args.out / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(asdict(summary) | {"passed": summary.passed}, indent=2))
    print(f"results: {path}")
    return 0 if summary.passed else 1


if __name__ == "__main__":
    sys.exit(main())
