"""One streamed OpenAI request, timed chunk by chunk; plus the small HTTP helpers around it."""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx

from loadtest.stats import RequestResult


class LoadtestError(Exception):
    """A setup problem worth one clear line to the user (bad URL, no models, ...)."""


def base_url(url: str) -> str:
    """Accept `http://host:port`, `.../v1` or `.../v1/` and return the part before `/v1`."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def check_loopback(url: str) -> None:
    """Refuse a URL whose host is not (or does not resolve only to) a loopback address.

    A load generator pointed at someone else's server is a denial-of-service tool; remote
    targets need an explicit `--allow-remote`.
    """
    host = urlsplit(url).hostname
    if not host:
        raise LoadtestError(f"cannot parse a host from --url {url!r}")
    try:
        addrs = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError as exc:
            raise LoadtestError(f"cannot resolve {host!r}: {exc}") from exc
        addrs = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
    if not addrs or not all(a.is_loopback for a in addrs):
        raise LoadtestError(
            f"{url} is not a loopback address; pass --allow-remote to load a remote server"
        )


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def first_model(client: httpx.AsyncClient, url: str) -> str:
    """The first id of GET /v1/models: the family's EFT composition (docs/api.md)."""
    resp = await client.get(f"{url}/v1/models")
    if resp.status_code != 200:
        raise LoadtestError(f"GET /v1/models -> {resp.status_code}: {resp.text[:200]}")
    data = resp.json().get("data") or []
    if not data:
        raise LoadtestError("GET /v1/models lists no model")
    return data[0]["id"]


async def iter_sse(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any] | None]:
    """Yield each `data:` payload as JSON, then None for `data: [DONE]`; skip the rest.

    SSE comments (`: ping`), `event:`/`id:` fields and blank separators carry no data.
    """
    async for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            yield None
            return
        if payload:
            yield json.loads(payload)


def tokens_in_chunk(chunk: dict[str, Any], chat: bool) -> int:
    """How many generated tokens this chunk stands for (0: a role, finish or usage chunk).

    With `logprobs` requested the server lists every token, so the count is exact. Without,
    one token per chunk is assumed; but a token whose bytes are not yet a whole character may
    stream as empty text, so emptiness alone does not mean "no token": an empty chunk counts
    unless it only finishes the sequence or only announces the assistant role.
    """
    choices = chunk.get("choices") or []
    if not choices:
        return 0
    choice = choices[0]
    lp = choice.get("logprobs")
    if isinstance(lp, dict):
        listed = lp.get("content") if chat else lp.get("tokens")
        if listed is not None:
            return len(listed)
    if chat:
        delta = choice.get("delta") or {}
        if delta.get("content") is None:
            return 0
        if delta["content"]:
            return 1
        return int("role" not in delta and choice.get("finish_reason") is None)
    if choice.get("text"):
        return 1
    return int("text" in choice and choice.get("finish_reason") is None)


def build_body(
    model: str,
    prompt: str,
    max_tokens: int,
    chat: bool,
    knobs: dict[str, float] | None,
    temperature: float,
    seed: int | None,
    logprobs: bool = False,
) -> dict[str, Any]:
    """An OpenAI streaming body; `ignore_eos` keeps every output at exactly `max_tokens`."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if knobs:
        body["eft"] = knobs
    if seed is not None:
        body["seed"] = seed
    if logprobs:
        # The chosen token's log-prob only: it makes the server stream one chunk per token
        # (text it holds back, such as half a UTF-8 character, would otherwise merge tokens).
        if chat:
            body["logprobs"] = True
        else:
            body["logprobs"] = 0
    return body


async def stream_request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], chat: bool
) -> RequestResult:
    """Send one streaming request and time every token chunk. Never raises for HTTP trouble:
    failures come back as a result with `ok=False` and a `status` to group errors by."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    res = RequestResult(start=time.perf_counter())
    last = res.start
    chunks = counted = 0  # token-carrying chunks, and the tokens they carried
    try:
        async with client.stream("POST", f"{url}{path}", json=body) as resp:
            res.status = str(resp.status_code)
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                res.error = _error_message(text)
                return res
            done = False
            async for chunk in iter_sse(resp.aiter_lines()):
                now = time.perf_counter()
                if chunk is None:
                    done = True
                    break
                if "error" in chunk:
                    res.status = "stream_error"
                    res.error = _error_message(json.dumps(chunk))
                    return res
                n = tokens_in_chunk(chunk, chat)
                if n:
                    chunks += 1
                    counted += n
                    res.token_times.append(now)
                    if res.ttft is None:
                        res.ttft = now - res.start
                    else:
                        res.itl.append(now - last)
                    last = now
                usage = chunk.get("usage")
                if usage:
                    res.output_tokens = int(usage.get("completion_tokens") or 0)
                    res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            res.e2e = time.perf_counter() - res.start
            if not done:
                res.status, res.error = "incomplete", "stream ended without data: [DONE]"
                return res
    except httpx.TimeoutException as exc:
        res.status, res.error = "timeout", repr(exc)
        return res
    except httpx.HTTPError as exc:
        res.status, res.error = "connection", repr(exc)
        return res
    except json.JSONDecodeError as exc:
        res.status, res.error = "bad_json", repr(exc)
        return res
    res.chunks = chunks
    if res.output_tokens == 0:
        res.output_tokens = counted  # the server sent no usage
    res.ok = True
    return res


def _error_message(text: str) -> str:
    """The OpenAI error body's message, or the raw text cut short."""
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))[:300]
        if err:
            return str(err)[:300]
    except (ValueError, AttributeError):
        pass
    return text[:300]
