"""Running one HTTP request's engine requests, and tying their life to the client's connection.

A completions request with several prompts becomes several engine requests; `Generation` merges
their event streams into one. All of them are submitted before any response byte is sent, so a
refusal (queue full, context too long, engine dead) is a proper HTTP status, never an error
inside a 200 stream.

Client disconnects (vLLM's `with_cancellation` idea): a non-streaming handler races against the
ASGI `http.disconnect` message; `SSEResponse` always listens for it while streaming, whatever
ASGI spec version the server announces (Starlette's own StreamingResponse stops listening at
spec 2.4 and only notices a gone client when a write fails, i.e. not while the request waits in
the queue). Either way `Generation.close()` cancels every engine request, freeing its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from fastapi import Request, Response
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from decoding.request import (
    EngineDeadError,
    GenerationRequest,
    QueueFullError,
    RequestValidationError,
    SequenceOutput,
)
from server.errors import ApiError, bad_request

_DONE = object()


def engine_error(exc: BaseException, retry_after: int = 1) -> ApiError:
    """Map an engine exception to the HTTP error a client should see."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestValidationError):
        code = "context_length_exceeded" if "context length" in exc.message else None
        return bad_request(exc.message, param=exc.param, code=code)
    if isinstance(exc, QueueFullError):
        return ApiError(429, f"The server is overloaded (waiting queue full): {exc}. "
                        f"Retry after {retry_after} s.", type="rate_limit_error",
                        code="rate_limit_exceeded", reason="overloaded",
                        headers={"Retry-After": str(retry_after)})
    if isinstance(exc, EngineDeadError):
        return ApiError(503, f"The engine is not running: {exc}", type="service_unavailable",
                        reason="unavailable", headers={"Retry-After": str(retry_after)})
    return ApiError(500, f"Internal error: {type(exc).__name__}: {exc}", type="server_error",
                    reason="error")


class Generation:
    """Several engine requests, merged into one stream of (request index, SequenceOutput)."""

    def __init__(self, engine: Any, requests: list[GenerationRequest]):
        self.engine = engine
        self.requests = requests
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._finished = 0
        self.completed = False
        self.closed = False

    def abort(self, error: ApiError) -> None:
        """End the consumer's `events()` with `error` (e.g. the shutdown deadline passed)."""
        self._queue.put_nowait((-1, error))

    async def _pump(self, i: int, stream: AsyncIterator[SequenceOutput]) -> None:
        try:
            async for out in stream:
                self._queue.put_nowait((i, out))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # forwarded to the consumer
            self._queue.put_nowait((i, exc))
        else:
            self._queue.put_nowait((i, _DONE))

    def start(self) -> None:
        """Submit everything. `Engine.submit` validates synchronously, so refusals (queue full,
        context too long, engine dead) raise here as ApiError, before any response is sent."""
        submit_all = getattr(self.engine, "submit_all", None)
        try:
            # One HTTP request is one admission unit: its prompts are queued together or not
            # at all (an engine without `submit_all` takes them one by one).
            if submit_all is not None:
                streams = submit_all(self.requests)
            else:
                streams = [self.engine.submit(r) for r in self.requests]
        except Exception as exc:
            self.close()
            raise engine_error(exc) from exc
        self._tasks = [asyncio.ensure_future(self._pump(i, s)) for i, s in enumerate(streams)]

    async def events(self) -> AsyncIterator[tuple[int, SequenceOutput]]:
        while self._finished < len(self.requests):
            i, item = await self._queue.get()
            if item is _DONE:
                self._finished += 1
            elif isinstance(item, BaseException):
                raise engine_error(item)
            else:
                yield i, item
        self.completed = True

    def close(self) -> None:
        """Cancel whatever is still running (idempotent). Frees the engine's batch slots."""
        self.closed = True
        for t in self._tasks:
            t.cancel()
        if not self.completed:
            for r in self.requests:
                with contextlib.suppress(Exception):
                    self.engine.cancel(r.request_id)


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


async def race_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run `work`, cancelling it if the client disconnects first (raises ClientGone).

    The body must already have been read: after it, the next ASGI message is the disconnect.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientGone()


PING = ": ping\n\n"  # an SSE comment: clients ignore it, proxies see a live connection


async def with_pings(content: AsyncIterator[str], interval: float) -> AsyncIterator[str]:
    """`content`, plus a comment ping whenever it has sent nothing for `interval` seconds
    (a stream waiting in the queue would otherwise look dead to a proxy's idle timeout)."""
    it = aiter(content)
    nxt: asyncio.Future[str] | None = None
    try:
        while True:
            if nxt is None:
                nxt = asyncio.ensure_future(anext(it))
            done, _ = await asyncio.wait({nxt}, timeout=interval)
            if not done:
                yield PING
                continue
            try:
                item = nxt.result()
            except StopAsyncIteration:
                return
            nxt = None
            yield item
    finally:
        if nxt is not None and not nxt.done():
            nxt.cancel()
            with contextlib.suppress(BaseException):
                await nxt
        elif nxt is not None and not nxt.cancelled():
            # It ended (StopAsyncIteration, or an error) while we waited at a `yield`: read its
            # outcome, or asyncio logs "Task exception was never retrieved" at ERROR when the
            # task is collected (seen on ordinary client disconnects).
            nxt.exception()
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


class SSEResponse(StreamingResponse):
    """`text/event-stream` that always stops (and closes its iterator) when the client goes,
    with comment pings while it has nothing to send."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None] | None = None,
                 ping_s: float = 15.0, **kwargs: Any):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(with_pings(content, ping_s), headers=headers, **kwargs)
        # Closing a generator that never started skips its `finally`; a client that leaves
        # before the first chunk must still free its engine requests, hence this hook.
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await _wait_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            # A cancel can land while the iterator is parked at a `yield`; close it now so
            # its cleanup (cancelling the engine requests) runs at once, not at GC.
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
            if self.on_close is not None:
                self.on_close()
