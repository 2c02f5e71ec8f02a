"""The benchmarks' `eft-serve` subprocess, and a sampler of its memory while it runs."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

from loadtest.prom import parse_metrics
from server.process import ServerProcess


class BenchServer(ServerProcess):
    """The benchmarks' `eft-serve`, plus what the memory monitor reads from it."""

    def __init__(
        self,
        config: str | Path,
        log_path: str | Path,
        max_batch_size: int = 32,
        extra_args: list[str] | None = None,
        ready_timeout: float = 300.0,
        program: list[str] | None = None,
    ):
        super().__init__(
            config,
            "--max-batch-size",
            str(max_batch_size),
            *(extra_args or []),
            log_path=log_path,
            ready_timeout=ready_timeout,
        )
        if program:  # --server-cmd: another program that takes eft-serve's flags
            self.cmd = [*program, *self.cmd[3:]]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        return psutil.Process(self.pid).memory_info().rss

    def metrics(self) -> dict:
        resp = httpx.get(f"{self.url}/metrics", timeout=10, trust_env=False)
        resp.raise_for_status()
        return parse_metrics(resp.text)

    def tail(self, n: int = 3000) -> str:
        return self.output()[-n:]


class MemoryMonitor:
    """Polls the server's RSS (psutil, every `rss_every` s) and its `eft_kv_cache_bytes{model}`
    gauge (/metrics, every `kv_every` s) in a thread; peaks are kept per named phase."""

    def __init__(self, server: BenchServer, rss_every: float = 0.1, kv_every: float = 1.0):
        self.server = server
        self.rss_every, self.kv_every = rss_every, kv_every
        self.peak_rss: dict[str, int] = {}
        self.peak_kv: dict[str, dict[str, float]] = {}  # phase -> per model at the peak total
        # 1-minute load average when each phase ends: other processes on a shared machine
        # show up here, so a reader can tell a slow figure from a busy machine.
        self.loadavg: dict[str, float] = {}
        self._phase: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> MemoryMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @contextmanager
    def phase(self, name: str):
        self._phase = name
        self._sample_kv()  # the phase's first sample, even if it is shorter than kv_every
        try:
            yield
        finally:
            self._sample_rss()
            self._sample_kv()
            self.loadavg[name] = os.getloadavg()[0]
            self._phase = None

    def kv_bytes(self) -> dict[str, float]:
        return kv_by_model(self.server.metrics())

    def _sample_rss(self) -> None:
        phase = self._phase
        if phase is None:
            return
        try:
            rss = self.server.rss()
        except psutil.Error:
            return
        self.peak_rss[phase] = max(self.peak_rss.get(phase, 0), rss)

    def _sample_kv(self) -> None:
        phase = self._phase
        if phase is None:
            return
        try:
            kv = self.kv_bytes()
        except (httpx.HTTPError, ValueError):
            return
        if sum(kv.values()) >= sum(self.peak_kv.get(phase, {}).values()):
            self.peak_kv[phase] = kv

    def _loop(self) -> None:
        next_kv = 0.0
        while not self._stop.wait(self.rss_every):
            self._sample_rss()
            if time.monotonic() >= next_kv:
                self._sample_kv()
                next_kv = time.monotonic() + self.kv_every


def kv_by_model(metrics: dict) -> dict[str, float]:
    return {labels.get("model", "?"): v for labels, v in metrics.get("eft_kv_cache_bytes", [])}
