"""Reading a request body: JSON only, bounded in size, time, nesting and text encoding.

Everything a client can send is checked here before any model code sees it, so that no body
can reach a 500: a non-JSON media type is a 415 (a browser's "simple" text/plain POST never gets
to start a generation), a body over the size limit a 413, a body that trickles in slower than
the read timeout a 408, and malformed JSON, nesting deeper than `MAX_DEPTH`, more than
`MAX_VALUES` objects, arrays and strings, or a string with a lone UTF-16 surrogate (valid JSON,
but no tokenizer or UTF-8 encoder takes it) a 400. A large body is parsed in a worker thread
(`parse_json_off_loop`), so that `/health` and running streams do not wait for it.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from starlette.requests import Request

from server.errors import ApiError, bad_request

MAX_DEPTH = 32  # the deepest real request (chat content parts) is 5 levels
# Objects, arrays and strings in one body (token ids are not counted): a real request holds a
# few thousand at most (3 per chat message), while 4 MB of `{}` is 1.4 M of them, which
# would take seconds to validate.
MAX_VALUES = 65536
# `{` and `[` bytes in one body, counted before parsing: json.loads holds the GIL (and so
# stalls the event loop, even from a worker thread) for ~1 s per million containers. Brackets
# inside strings count too, hence the margin over MAX_VALUES.
MAX_BRACKETS = 2 * MAX_VALUES
OFF_LOOP_BYTES = 64 * 1024  # larger bodies are parsed in a worker thread
_SURROGATE = re.compile("[\ud800-\udfff]")
_SCALARS = {int, float, bool, type(None)}


def check_media_type(request: Request) -> None:
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";", 1)[0].strip().lower()
    if media != "application/json":
        shown = media or "none"
        raise ApiError(
            415,
            f"Unsupported Content-Type `{shown}`: send the body as `application/json`.",
            param="Content-Type",
            code="unsupported_media_type",
        )


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"Request body larger than {limit} bytes.", reason="too_large")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"Request body larger than {limit} bytes.", reason="too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError as exc:
        # The rest of the body may still trickle in: the connection cannot be reused.
        raise ApiError(
            408,
            f"The request body did not arrive within {timeout:g} s.",
            code="request_timeout",
            headers={"Connection": "close"},
        ) from exc


async def parse_json_off_loop(raw: bytes) -> Any:
    if len(raw) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(parse_json, raw)
    return parse_json(raw)


def parse_json(raw: bytes) -> Any:
    brackets = raw.count(b"{") + raw.count(b"[")
    if brackets > MAX_BRACKETS:
        raise bad_request(
            f"The JSON body holds {brackets} `{{` and `[` characters, more than {MAX_BRACKETS}; "
            f"a request has at most {MAX_VALUES} objects, arrays and strings.",
            code="invalid_json",
        )
    try:
        body = json.loads(raw)
    except RecursionError as exc:
        raise bad_request(
            f"The JSON body is nested more than {MAX_DEPTH} levels deep.", code="invalid_json"
        ) from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"Malformed JSON body: {exc}", code="invalid_json") from exc
    check_structure(body)
    return body


def check_structure(body: Any) -> None:
    """Iteratively (no recursion to exhaust): nesting depth and lone surrogates, naming the
    first offending field; and the count of values."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(body, ())]
    walked = 1  # values pushed so far; a container's are counted before any is pushed
    while stack:
        value, path = stack.pop()
        walked_children = 0
        if isinstance(value, dict | list):
            walked_children = _values(value)
            walked += walked_children
            if walked > MAX_VALUES:
                raise bad_request(
                    f"The JSON body holds more than {MAX_VALUES} objects, arrays and strings.",
                    param=_param(path[:1]),
                    code="invalid_json",
                )
        if len(path) > MAX_DEPTH:
            raise bad_request(
                f"The JSON body is nested more than {MAX_DEPTH} levels deep.",
                param=_param(path[:1]),
                code="invalid_json",
            )
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise bad_request(
                    f"{_param(path) or 'body'}: the string holds a lone UTF-16 "
                    "surrogate, which is not text",
                    param=_param(path),
                )
        elif isinstance(value, dict):
            for k, v in value.items():
                if _SURROGATE.search(k):
                    raise bad_request(
                        "A JSON key holds a lone UTF-16 surrogate.", param=_param(path)
                    )
                stack.append((v, (*path, k)))
        elif isinstance(value, list) and walked_children:
            stack.extend(
                (v, (*path, str(i)))
                for i, v in enumerate(value)
                if isinstance(v, str | dict | list)
            )  # token ids need no look


def _values(container: dict[str, Any] | list[Any]) -> int:
    items = container.values() if isinstance(container, dict) else container
    if _SCALARS.issuperset(map(type, items)):  # token ids: one pass in C, nothing to walk
        return 0
    return sum(isinstance(v, str | dict | list) for v in items)


def _param(path: tuple[str, ...]) -> str | None:
    return ".".join(p for p in path if not p.isdigit()) or None
