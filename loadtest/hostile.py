"""Hostile requests (issue 20): bodies that cost far more than their size, and the checks they
must pass. Used by `python -m loadtest.fuzz` (after the schema cases), `python -m loadtest.soak`
(mixed into the load) and tests/test_request_cost.py.

Each case must be answered within `ANSWER_S`, either with a bounded 200 or with a 400 in the
OpenAI shape whose message names the limit it is over, while `/health` keeps answering within
`HEALTH_S`. The bodies adapt to the served model's context (`max_model_len`), so the cases hit
the same limits on the demo family, a 64-token fuzz family or a real model.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

ANSWER_S = 2.0
HEALTH_S = 1.0
# What a 400 must name: one of the limits a request can be over.
LIMITS = ("objects, arrays and strings", "cannot fit", "--max-seqs-per-request",
          "--max-response-bytes", "maximum context length", "larger than")


@dataclass
class Case:
    name: str
    path: str
    body: dict[str, Any]
    names: str | None = None  # the limit its 400 must name, where the server's flags fix it

    def raw(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":")).encode()


def cases(model: str, context: int) -> list[Case]:
    """Issue 20's reproducers, scaled to a model with `context` tokens."""
    prompt = min(255, context - 1)  # echo scoring: the prompt must fit, with max_tokens 0
    chat = "/v1/chat/completions"
    return [
        Case("empty-messages", chat, {"model": model, "max_tokens": 1,
                                      "messages": [{"role": "user"}] * 262_000},
             "objects, arrays and strings"),
        Case("empty-content", chat, {"model": model, "max_tokens": 1,
                                     "messages": [{"role": "user", "content": ""}] * 144_000},
             "objects, arrays and strings"),
        Case("unknown-field", chat, {"model": model, "max_tokens": 1, "junk": [{}] * 1_390_000,
                                     "messages": [{"role": "user", "content": "hi"}]},
             "objects, arrays and strings"),
        Case("more-messages-than-context", chat, {
            "model": model, "max_tokens": 1,
            "messages": [{"role": "user"}] * min(context + 1, 30_000)},
             "cannot fit" if context < 30_000 else None),
        Case("tokenize-more-messages-than-context", "/tokenize",
             {"messages": [{"role": "user"}] * min(context + 1, 30_000)},
             "cannot fit" if context < 30_000 else None),
        # 1.3 M token ids (2.6 MB): validating them alone took the event loop most of a second.
        Case("long-token-prompt", "/v1/completions", {
            "model": model, "prompt": [7] * 1_300_000, "max_tokens": 1}, "cannot fit"),
        Case("long-detokenize", "/detokenize", {"tokens": [7] * 1_300_000}, "cannot fit"),
        Case("echo-trace-n16", "/v1/completions", {
            "model": model, "prompt": [[7] * prompt] * 64, "max_tokens": 0, "echo": True,
            "logprobs": 20, "n": 16, "eft": {"trace": True}}, "--max-seqs-per-request"),
        Case("echo-trace-n1", "/v1/completions", {
            "model": model, "prompt": [[7] * prompt] * 64, "max_tokens": 0, "echo": True,
            "logprobs": 20, "eft": {"trace": True}}),
        Case("n16-logprobs", "/v1/completions", {
            "model": model, "prompt": [[5]] * 64, "n": 16, "max_tokens": 255,
            "ignore_eos": True, "logprobs": 20}, "--max-seqs-per-request"),
    ]


def served(url: str, headers: dict[str, str] | None = None) -> tuple[str, int]:
    """The first served model's id and context."""
    card = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]
    return card["id"], int(card["max_model_len"])


class HealthWatch:
    """While open, polls /health; `worst` is its slowest answer."""

    def __init__(self, url: str):
        self.url = url
        self.worst = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)

    def poll(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                t = time.monotonic()
                try:
                    client.get(f"{self.url}/health")
                except httpx.HTTPError:
                    pass
                self.worst = max(self.worst, time.monotonic() - t)
                self.stop.wait(0.02)

    def __enter__(self) -> HealthWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)


def check(case: Case, status: int, body: bytes, took: float, limit: float = ANSWER_S
          ) -> str | None:
    """Why this answer (after `took` seconds) fails the case, or None."""
    if took > limit:
        return f"answered after {took:.2f} s (> {limit:g} s)"
    if status == 200:
        return None
    if status != 400:
        return f"status {status}: {body[:200]!r}"
    try:
        err = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return f"a 400 not in the OpenAI shape: {body[:200]!r}"
    message = str(err.get("message", ""))
    if case.names is not None and case.names not in message:
        return f"the 400 does not name {case.names!r}: {message[:200]}"
    if not any(limit in message for limit in LIMITS):
        return f"the 400 names no limit: {message[:200]}"
    return None


def run(url: str, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every case once, watching /health; returns the failures."""
    model, context = served(url, headers)
    failures = []
    with httpx.Client(timeout=60, headers={**(headers or {}),
                                           "content-type": "application/json"}) as client:
        for case in cases(model, context):
            with HealthWatch(url) as watch:
                t = time.monotonic()
                r = client.post(f"{url}{case.path}", content=case.raw())
                took = time.monotonic() - t
            why = check(case, r.status_code, r.content, took)
            if why is None and watch.worst > HEALTH_S:
                why = f"/health took {watch.worst:.2f} s (> {HEALTH_S:g} s)"
            if why is not None:
                failures.append({"operation": f"POST {case.path}", "mode": f"hostile {case.name}",
                                 "status": r.status_code, "body": case.name,
                                 "response": r.text[:300], "error": why})
    for name, why in (("lockout", lockout(url, model, headers)),
                      ("oversized-head", oversized_head(url))):
        if why is not None:
            failures.append({"operation": "POST /v1/completions", "mode": f"hostile {name}",
                             "status": None, "body": name, "response": "", "error": why})
    return failures


def lockout(url: str, model: str, headers: dict[str, str] | None = None) -> str | None:
    """Three requests of 64 prompts each must leave room for a fourth client (issue 20's 3):
    the fourth gets a 200, not a 429. Why not, or None."""
    big = {"model": model, "prompt": [[5]] * 64, "max_tokens": 4, "ignore_eos": True}
    small = {"model": model, "prompt": [[5]], "max_tokens": 1}
    with httpx.Client(timeout=120, headers=headers) as client, ThreadPoolExecutor(3) as pool:
        copies = [pool.submit(client.post, f"{url}/v1/completions", json=big) for _ in range(3)]
        time.sleep(0.2)
        fourth = client.post(f"{url}/v1/completions", json=small)
        statuses = [c.result().status_code for c in copies]
    if fourth.status_code != 200:
        return f"the fourth request got {fourth.status_code} behind 3 x 64 prompts ({statuses})"
    return None


def send_head(url: str, size: int, pause: float = 0.005) -> bytes:
    """Send a request head with a `size`-byte Authorization header in 8 KiB pieces (`pause`
    apart, as a slow client would) and return every byte of the reply."""
    parts = urlsplit(url)
    head = (f"GET /v1/models HTTP/1.1\r\nHost: {parts.hostname}\r\nAuthorization: Bearer "
            f"{'k' * size}\r\n\r\n").encode()
    with socket.create_connection((parts.hostname, parts.port or 80), timeout=10) as sock:
        for i in range(0, len(head), 8192):
            try:
                sock.sendall(head[i:i + 8192])
            except OSError:
                break  # answered and closed before the rest arrived
            time.sleep(pause)
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except OSError:
            pass
    return reply


def oversized_head(url: str, size: int = 100_000) -> str | None:
    """A request head of `size` bytes sent in pieces: a 400 in the OpenAI shape, or why not."""
    reply = send_head(url, size)
    status, _, rest = reply.partition(b"\r\n")
    body = rest.partition(b"\r\n\r\n")[2]
    if not status.startswith(b"HTTP/1.1 400"):
        return f"a {size}-byte head got {status[:40]!r}"
    try:
        json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"a {size}-byte head got a 400 not in the OpenAI shape: {body[:100]!r}"
    return None
