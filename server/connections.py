"""Connection limits that uvicorn lacks: a deadline for a request's head, and a hard cap.

uvicorn times out idle keep-alive connections, but a peer that sends half a request head holds
its connection (and a file handle) forever, and it accepts connections without bound. The
protocol class below closes a connection whose request line and headers have not all arrived
within `read_timeout` seconds (of the connection opening, or of the previous response), and
closes at once any connection beyond `max_connections`. uvicorn's own `limit_concurrency` (set
to the same cap) answers 503 to requests that arrive while the server is at the cap; the body's
own deadline is checked by the app (`server.body`, 408). A request h11 cannot parse (a head
over its 16 KiB limit: a 100 KB `Authorization` header) gets the OpenAI error shape as every
other 400 does, not uvicorn's text/plain one.
"""

from __future__ import annotations

import asyncio
import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("eft_serve")
H11_HEAD_LIMIT = 16 * 1024  # h11's default max_incomplete_event_size, which uvicorn keeps


def bounded_protocol(read_timeout: float, max_connections: int) -> type[H11Protocol]:
    class BoundedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning(
                    "connection refused: %d open connections (--max-connections)", max_connections
                )
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(read_timeout, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            # Still waiting for (the rest of) a request head: nothing to answer, just close.
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:
                self._disarm()  # the head is in; the app bounds the body

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def send_400_response(self, msg: str) -> None:
            limit = self.config.h11_max_incomplete_event_size or H11_HEAD_LIMIT
            body = json.dumps({"error": {
                "message": f"Invalid HTTP request: it is malformed, or its request line and "
                           f"headers are larger than {limit} bytes.",
                "type": "invalid_request_error", "param": None, "code": "invalid_http_request",
            }}).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                       (b"content-length", str(len(body)).encode())]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return BoundedH11Protocol
