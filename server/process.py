"""`eft-serve` as a child process on a free loopback port.

One implementation for everything that needs a real server in another process: the demo
evaluation, the benchmarks and the tests that talk to it over HTTP.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`eft-serve --config CONFIG --host 127.0.0.1 --port P ARGS...` until `stop()`.

    It runs with this interpreter (`python -m server.cli`), so it is the same installation
    whatever PATH holds, in its own process group, logging to a file (an unread pipe would fill
    up and block it). `start()` returns once `/ready` answers 200, or raises with the log's tail.
    """

    def __init__(
        self,
        config: str | Path,
        *args: str,
        log_path: str | Path | None = None,
        ready_timeout: float = 300.0,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [
            sys.executable, "-m", "server.cli", "--config", str(config),
            "--host", "127.0.0.1", "--port", str(self.port), *args,
        ]  # fmt: skip
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="eft-serve-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
            )
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"eft-serve exited with {self.proc.returncode}:\n{self.output()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            f"eft-serve not ready after {self.ready_timeout:.0f}s:\n{self.output()[-3000:]}"
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (a graceful drain), then SIGKILL after `timeout`; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
