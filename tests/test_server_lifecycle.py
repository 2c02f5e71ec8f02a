"""A real `eft-serve` process: connection deadlines and cap, and the shutdown deadline.

The server runs with a 1 s read timeout, at most 8 connections, one batch slot and a 1 s
shutdown timeout; the test after the others stops it with SIGTERM while streams are open. A
server of its own then gets SIGINT twice. An oversized request head gets the JSON error shape.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.hostile import send_head
from server.process import ServerProcess

FAMILY = "tiny"
MAX_CONNECTIONS = 8


@pytest.fixture(scope="module")
def server(tiny_family_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("eft-serve") / "server.log"
    args = (
        "--read-timeout",
        "1",
        "--max-connections",
        str(MAX_CONNECTIONS),
        "--shutdown-timeout",
        "1",
        "--max-batch-size",
        "1",
        "--max-waiting",
        "8",
        "--threads",
        "1",
        "--log-level",
        "info",
    )
    with ServerProcess(tiny_family_path, *args, log_path=log, ready_timeout=90) as srv:
        yield srv


def waiting(server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "eft_num_requests_waiting":
                return s.value
    raise KeyError("eft_num_requests_waiting")


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closes `sock` within `seconds`, and what it sent before."""
    sock.settimeout(seconds)
    got = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return True, got
            got += chunk
    except TimeoutError:
        return False, got
    except ConnectionResetError:
        return True, got


def test_half_sent_request_head_is_closed_after_the_read_timeout(server):
    sock = connect(server)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: app")
    t0 = time.monotonic()
    closed, _ = closed_within(sock, 5)
    assert closed, "a half-sent request head holds its connection"
    assert 0.5 < time.monotonic() - t0 < 4
    sock.close()


def test_trickling_body_is_408_after_the_read_timeout(server):
    sock = connect(server)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
        b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"mod'
    )
    closed, got = closed_within(sock, 5)
    sock.close()
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), got[:200]
    assert b"x-request-id" in head.lower()
    assert json.loads(body)["error"]["code"] == "request_timeout"


def test_connections_beyond_the_cap_are_closed(server):
    socks = [connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        extra = connect(server)
        closed, _ = closed_within(extra, 0.5)
        assert closed, "a connection beyond --max-connections stays open"
        extra.close()
    finally:
        for s in socks:
            s.close()
    time.sleep(0.2)
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


def test_oversized_request_head_gets_the_json_error_shape(server):
    # A 100 KB Authorization header, arriving in pieces: past h11's 16 KiB limit for an
    # incomplete head, it is refused, in the OpenAI error shape like every other 400.
    reply = send_head(server.url, 100_000, pause=0.01)
    status, _, rest = reply.partition(b"\r\n")
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 400"), reply[:300]
    assert b"content-type: application/json" in headers.lower()
    err = json.loads(body)["error"]
    assert err["code"] == "invalid_http_request" and "16384 bytes" in err["message"]
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


class OpenRequests:
    """Two streams and a plain request on a one-row server: the first stream runs, the
    second stream and the plain request wait in the queue."""

    def __init__(self, server):
        self.url = server.url
        self.body = {"model": FAMILY, "prompt": "the", "max_tokens": 400, "ignore_eos": True}
        self.streams: list[list[str]] = [[], []]
        self.plain: list[httpx.Response] = []
        self.first = threading.Event()
        self.threads = [threading.Thread(target=self.stream, args=(0,))]
        self.threads[0].start()
        assert self.first.wait(30)
        self.threads += [threading.Thread(target=self.stream, args=(1,)),
                         threading.Thread(target=self.post)]
        for t in self.threads[1:]:
            t.start()
        deadline = time.monotonic() + 30
        while waiting(server) < 2:  # both queued behind the first
            assert time.monotonic() < deadline
            time.sleep(0.05)

    def stream(self, i: int) -> None:
        with httpx.stream("POST", f"{self.url}/v1/completions",
                          json={**self.body, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    self.first.set()
                if line:
                    self.streams[i].append(line)

    def post(self) -> None:
        self.plain.append(httpx.post(f"{self.url}/v1/completions", json=self.body, timeout=60))

    def join(self) -> None:
        for t in self.threads:
            t.join(30)


def test_shutdown_timeout_ends_open_requests_cleanly(server):
    """Last in the module: stops the server. One batch slot: the first stream runs, the
    second stream and a plain request wait; SIGTERM, and 1 s later all of them end."""
    open_requests = OpenRequests(server)
    streams, plain = open_requests.streams, open_requests.plain
    server.proc.send_signal(signal.SIGTERM)
    open_requests.join()
    assert server.proc.wait(30) == 0
    log = server.output()
    for lines in streams:
        data = [ln for ln in lines if ln.startswith("data: ")]
        assert data[-1] == "data: [DONE]", data[-3:]
        last = json.loads(data[-2][len("data: ") :])
        finished = last.get("choices") and last["choices"][0].get("finish_reason")
        assert finished == "length" or last["error"]["code"] == "server_shutting_down", last
    waited = json.loads([ln for ln in streams[1] if ln.startswith("data: ")][-2][6:])
    assert waited["error"]["code"] == "server_shutting_down"  # it never got a slot
    assert plain[0].status_code == 503, plain[0].text
    assert plain[0].json()["error"]["code"] == "server_shutting_down"
    assert log.count("shutdown timeout") == 1, log[-3000:]
    assert "Traceback" not in log and "Cancel" not in log, log[-3000:]


def test_second_sigint_ends_open_requests_at_once_and_exits_130(tiny_family_path, tmp_path):
    """The first SIGINT starts the drain (60 s of --shutdown-timeout here); the second ends
    every open request now, each in its shape (error chunk and [DONE], a JSON 503), with no
    ASGI traceback, and the exit status says the server was cut short."""
    args = ("--max-batch-size", "1", "--shutdown-timeout", "60", "--threads", "1")
    with ServerProcess(tiny_family_path, *args, log_path=tmp_path / "server.log",
                       ready_timeout=90) as srv:
        open_requests = OpenRequests(srv)
        srv.proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        srv.proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        open_requests.join()
        assert srv.proc.wait(30) == 130
        assert time.monotonic() - t0 < 10  # not the 60 s shutdown timeout
        for lines in open_requests.streams:
            assert lines[-1] == "data: [DONE]", lines[-3:]
            assert json.loads(lines[-2][len("data: "):])["error"]["code"] == "server_shutting_down"
        plain = open_requests.plain[0]
        assert plain.status_code == 503 and plain.json()["error"]["code"] == "server_shutting_down"
        log = srv.output()
        assert "second SIGINT" in log and "Traceback" not in log, log[-3000:]
