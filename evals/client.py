"""The HTTP side of a sweep: one request per (prompt, sample chunk), through the OpenAI API.

Requests are plain JSON over httpx (no SDK needed); concurrency comes from the caller's thread
pool, and the server batches concurrent requests into shared forward passes. A 429/503 is
retried after its Retry-After; any other error status stops the sweep with the server's message.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from evals.prompts import Item

MAX_N = 16  # the server's bound on `n`; more samples go in several requests


class SweepError(RuntimeError):
    """The server refused a request (the message says which and why)."""


@dataclass(frozen=True)
class Sampling:
    """Request settings shared by every point of a sweep (part of each point's resume key)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float | None = None
    samples: int = 1
    seed: int | None = None
    endpoint: str = "auto"  # auto (messages -> chat, prompt -> completions) | chat | completions
    echo: bool = False  # score the prompt itself: echo + max_tokens 0 (completions only)
    extra: dict[str, Any] = field(default_factory=dict)  # more body fields, sent as given

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Client:
    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout: float = 600.0,
        concurrency: int = 16,
        retries: int = 30,
    ):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.http = httpx.Client(
            base_url=url.rstrip("/"), headers=headers, timeout=timeout, limits=limits
        )
        self.url = url
        self.retries = retries

    def close(self) -> None:
        self.http.close()

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        for attempt in range(self.retries + 1):
            try:
                r = self.http.post(path, json=body)
            except httpx.TransportError as exc:
                if attempt >= 2:
                    raise SweepError(f"POST {self.url}{path}: {exc}") from exc
                time.sleep(1.0 + attempt)
                continue
            if r.status_code in (429, 503) and attempt < self.retries:
                time.sleep(min(30.0, float(r.headers.get("retry-after") or 1)))
                continue
            if r.status_code != 200:
                try:
                    message = r.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = r.text[:500]
                raise SweepError(
                    f"POST {path} model={body.get('model')} eft={body.get('eft')}: "
                    f"HTTP {r.status_code}: {message}"
                )
            return r.json()
        raise SweepError(f"POST {path}: still overloaded after {self.retries} retries")

    def models(self) -> list[str]:
        r = self.http.get("/v1/models")
        r.raise_for_status()
        return [m["id"] for m in r.json()["data"]]

    def tokenize(self, model: str, text: str, special: bool) -> list[int]:
        body = {"model": model, "prompt": text, "add_special_tokens": special}
        return list(self.post("/tokenize", body)["tokens"])

    def choices(
        self,
        model: str,
        item: Item,
        eft: dict[str, Any] | None,
        sampling: Sampling,
        n: int,
        seed: int | None,
    ) -> list[dict[str, Any]]:
        """The `n` choices of one request, each with `text` (chat: the message content)."""
        body: dict[str, Any] = {"model": model, "n": n, "temperature": sampling.temperature}
        if sampling.top_p is not None:
            body["top_p"] = sampling.top_p
        if seed is not None:
            body["seed"] = seed
        if eft is not None:
            body["eft"] = eft
        body.update(sampling.extra)
        chat = sampling.endpoint == "chat" or (
            sampling.endpoint == "auto" and item.messages is not None
        )
        score_from = None
        if sampling.echo:
            if item.prompt is None:
                raise SweepError(f"--echo scores completions prompts; {item.id} has messages")
            body.update(echo=True, max_tokens=0, logprobs=0)
            if item.completion is not None:
                # Token ids of prompt + completion: the scored span starts exactly where the
                # completion's own tokens do (a joined string could merge across the boundary).
                head = self.tokenize(model, item.prompt, special=True)
                tail = self.tokenize(model, item.completion, special=False)
                body["prompt"], score_from = head + tail, len(head)
            else:
                body["prompt"], score_from = item.prompt, 0
            out = self.post("/v1/completions", body)
        elif chat:
            messages = item.messages or [{"role": "user", "content": item.prompt}]
            body.update(messages=messages, max_tokens=sampling.max_tokens)
            out = self.post("/v1/chat/completions", body)
        else:
            if item.prompt is None:
                raise SweepError(f"--endpoint completions needs `prompt`; {item.id} has messages")
            body.update(prompt=item.prompt, max_tokens=sampling.max_tokens)
            out = self.post("/v1/completions", body)
        choices = sorted(out["choices"], key=lambda c: c.get("index", 0))
        for c in choices:
            if "message" in c:
                c["text"] = (c["message"] or {}).get("content") or ""
            if score_from is not None:
                c["score_from"] = score_from
        return choices
