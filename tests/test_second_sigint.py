"""A second SIGINT ends every open request in its proper shape, then the process exits 130.

The first SIGINT starts the drain (in-flight requests get --shutdown-timeout, 60 s here); the
second ends them now: every stream with an error chunk and `[DONE]`, a waiting non-streamed
request with a JSON 503, no ASGI traceback, and a non-zero exit (as Ctrl-C twice should).
"""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx

from server.process import ServerProcess


def test_second_sigint_ends_streams_with_done_and_exits_non_zero(tiny_family_path, tmp_path):
    args = ("--max-batch-size", "1", "--shutdown-timeout", "60", "--threads", "1")
    srv = ServerProcess(tiny_family_path, *args, log_path=tmp_path / "server.log",
                        ready_timeout=90).start()
    try:
        body = {"model": "tiny", "prompt": "the", "max_tokens": 400, "ignore_eos": True}
        streams: list[list[str]] = [[], []]
        plain: list[httpx.Response] = []
        first = threading.Event()

        def stream(i: int) -> None:
            with httpx.stream("POST", f"{srv.url}/v1/completions",
                              json={**body, "stream": True}, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        streams[i].append(line)
                        first.set()

        def post() -> None:
            plain.append(httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60))

        threads = [threading.Thread(target=stream, args=(0,))]
        threads[0].start()
        assert first.wait(30)
        threads += [threading.Thread(target=stream, args=(1,)), threading.Thread(target=post)]
        for t in threads[1:]:
            t.start()
        time.sleep(0.5)  # both wait behind the first (one batch row)
        srv.proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        srv.proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        for t in threads:
            t.join(30)
        assert srv.proc.wait(30) == 130
        assert time.monotonic() - t0 < 10  # not the 60 s shutdown timeout
        for lines in streams:
            assert lines[-1] == "data: [DONE]", lines[-3:]
            last = json.loads(lines[-2][len("data: "):])
            assert last["error"]["code"] == "server_shutting_down", last
        assert plain[0].status_code == 503, plain[0].text
        assert plain[0].json()["error"]["code"] == "server_shutting_down"
        log = srv.output()
        assert "second SIGINT" in log
        assert "Traceback" not in log, log[-3000:]
    finally:
        srv.stop()
