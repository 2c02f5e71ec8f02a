"""`python -m loadtest.soak --minutes M`: a long mixed load on a fresh eft-serve, then SIGTERM.

    python -m loadtest.soak --minutes 30                 # the embedded demo family
    python -m loadtest.soak --minutes 3 --config F.yaml --json soak.json

It starts `eft-serve` itself (it needs the process: its memory, and the signal at the end) and
keeps 8-16 clients busy (the number changes every few seconds) with mixed requests: completions
and chat, streamed or not, n 1-2, random knobs and sampling settings, and about one in seven
clients leaving early (mid-stream, or before a plain answer). About one request in
`1 / HOSTILE_RATE` is one of `loadtest.hostile`'s (4 MB of empty messages, a 64-prompt x n=16
logprob bomb, ...): each must be answered within `HOSTILE_ANSWER_S` (the load shares the
cores) with a 200, a 429 or a 400 naming its limit. At the
end it sends SIGTERM while requests are in flight. It prints the requests, the failures by
reason, and the server's RSS at start (after a warm-up: 10% of the run, at least 6 s), end and
max, and exits 1 on

- a leak: RSS once the load has stopped more than 5% above the start (each the lowest 1 s
  sample of a 2.5 s window, so one request's freed buffers do not count),
- a lost request: a response that is neither complete nor a proper HTTP/OpenAI error (a stream
  without `[DONE]`, a dropped connection), queued/running requests left after the load,
- a hang: a request without an answer within `--request-timeout`, or a server that does not
  exit 0 after SIGTERM within its shutdown timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from loadtest import hostile
from server.process import ServerProcess

# RSS "start" is read after this part of the run, and at least WARMUP_MIN_S into it (at most
# half): the server's memory rises for its first seconds of load (allocator pools, the KV pages
# and decode copy touched as batches widen), and 10% of a short CI run (1.8 s) fell inside
# that rise, so a bounded cache filling read as a leak.
WARMUP_FRACTION = 0.1
WARMUP_MIN_S = 6.0
SETTLE_S = 2.5  # start and end RSS: the lowest sample of this long after the warm-up / the load
LEAK_RATIO = 0.05
SHUTDOWN_TIMEOUT_S = 5.0
HOSTILE_RATE = 0.03
HOSTILE_ANSWER_S = 8.0
WORDS = (
    "the river runs past the old mill where we kept the boats in winter and the children "
    "learned to row before the ice came down from the hills"
).split()


@dataclass
class Soak:
    url: str
    rng: random.Random
    request_timeout: float
    model: str = ""
    context: int = 0
    experts: list[str] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    active: int = 16

    def body(self) -> tuple[str, dict[str, Any]]:
        r = self.rng
        prompt = " ".join(r.choice(WORDS) for _ in range(r.randint(2, 40)))
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": r.randint(4, 32),
            "n": r.choice([1, 1, 1, 2]),
            "stream": r.random() < 0.5,
            "temperature": r.choice([0.0, 0.7, 1.0]),
            "top_p": r.choice([1.0, 0.9]),
            "seed": r.randint(0, 9),
        }
        knobs = {e: round(r.uniform(0, 1.5), 2) for e in self.experts if r.random() < 0.7}
        if r.random() < 0.3:
            knobs["base_top_p"] = 0.9
        if knobs:
            body["eft"] = knobs
        if r.random() < 0.5:
            return "/v1/completions", {**body, "prompt": prompt}
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}

    def fail(self, reason: str, detail: str) -> None:
        self.failures[reason] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{reason}: {detail[:200]}")

    async def one(self, client: httpx.AsyncClient) -> None:
        if self.rng.random() < HOSTILE_RATE:
            await self.hostile(client)
            return
        path, body = self.body()
        leave = self.rng.random() < 0.15  # a client that goes away early
        try:
            await asyncio.wait_for(self._send(client, path, body, leave), self.request_timeout)
        except asyncio.TimeoutError:
            self.fail("hang", f"{path} no answer in {self.request_timeout:g} s")
        except httpx.HTTPError as exc:
            self.fail("lost", f"{path} {type(exc).__name__}: {exc}")

    async def _send(
        self, client: httpx.AsyncClient, path: str, body: dict[str, Any], leave: bool
    ) -> None:
        url = self.url + path
        if not body["stream"]:
            post = client.post(url, json=body)
            if leave:  # gone before the answer: the server must cancel it
                try:
                    r = await asyncio.wait_for(post, self.rng.uniform(0, 0.3))
                except asyncio.TimeoutError:
                    self.outcomes["left early"] += 1
                    return
            else:
                r = await post
            self._status(r.status_code, r.text)
            return
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                self._status(r.status_code, (await r.aread()).decode(errors="replace"))
                return
            stop_after = self.rng.randint(1, 6) if leave else None
            data = []
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    data.append(line)
                    if stop_after is not None and len(data) >= stop_after:
                        self.outcomes["left early"] += 1
                        return  # closing the stream drops the connection
            if not data or data[-1] != "data: [DONE]":
                self.fail("lost", f"{path} stream ended without [DONE]: {data[-1:]}")
            elif '"error"' in data[-2]:
                if json.loads(data[-2][6:])["error"].get("code") == "server_shutting_down":
                    self.outcomes["ended by shutdown"] += 1
                else:
                    self.fail("stream error chunk", data[-2])
            else:
                self.outcomes["ok"] += 1

    async def hostile(self, client: httpx.AsyncClient) -> None:
        case = self.rng.choice(hostile.cases(self.model, self.context))
        t = time.monotonic()
        try:
            r = await client.post(self.url + case.path, content=case.raw(),
                                  headers={"content-type": "application/json"})
        except httpx.HTTPError as exc:
            self.fail("lost", f"hostile {case.name}: {type(exc).__name__}: {exc}")
            return
        took = time.monotonic() - t
        why = None
        if r.status_code != 429:  # the queue is full: backpressure, a proper answer
            why = hostile.check(case, r.status_code, r.content, took, HOSTILE_ANSWER_S)
        if why is None:
            self.outcomes[f"hostile {r.status_code}"] += 1
        else:
            self.fail("hostile", f"{case.name}: {why}")

    def _status(self, status: int, text: str) -> None:
        if status == 200:
            self.outcomes["ok"] += 1
        elif status in (429, 503):
            self.outcomes[f"refused {status}"] += 1  # backpressure, a proper answer
        else:
            self.fail(f"http {status}", text)

    async def worker(self, i: int, client: httpx.AsyncClient, until: float) -> None:
        while time.monotonic() < until:
            if i >= self.active:
                await asyncio.sleep(0.2)
                continue
            await self.one(client)


async def sample_rss(
    proc: psutil.Process, out: list[tuple[float, int]], stop: asyncio.Event
) -> None:
    while not stop.is_set():
        out.append((time.monotonic(), proc.memory_info().rss))
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            pass


async def soak(
    srv: ServerProcess, minutes: float, seed: int, request_timeout: float
) -> dict[str, Any]:
    rng = random.Random(seed)
    state = Soak(srv.url, rng, request_timeout)
    assert srv.proc is not None
    proc = psutil.Process(srv.proc.pid)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
    async with httpx.AsyncClient(timeout=request_timeout, limits=limits) as client:
        models = (await client.get(f"{srv.url}/v1/models")).json()["data"]
        state.model = models[0]["id"]
        state.context = int(models[0]["max_model_len"])
        state.experts = list(models[0]["eft"]["experts"])
        rss: list[tuple[float, int]] = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(proc, rss, stop))
        t0 = time.monotonic()
        until = t0 + minutes * 60

        async def vary() -> None:  # concurrency between 8 and 16, changing every few seconds
            while time.monotonic() < until:
                state.active = rng.randint(8, 16)
                await asyncio.sleep(rng.uniform(2, 8))

        varying = asyncio.create_task(vary())
        await asyncio.gather(*(state.worker(i, client, until) for i in range(16)))
        varying.cancel()
        load_end = time.monotonic()
        await asyncio.sleep(SETTLE_S)  # cancellations settle; RSS sampled at rest
        text = (await client.get(f"{srv.url}/metrics")).text
        left = {
            k: _gauge(text, k) for k in ("eft_num_requests_running", "eft_num_requests_waiting")
        }
        for k, v in left.items():
            if v:
                state.fail("lost", f"{k} = {v:g} after the load")
        stop.set()
        await sampler
        # The lowest samples of each window: one request's transient buffers (a hostile 4 MB
        # body) freed a second later are not what the server keeps.
        warm = t0 + warmup_s(until - t0)
        start_rss = min((v for t, v in rss if warm <= t <= warm + SETTLE_S), default=rss[0][1])
        end_rss = min((v for t, v in rss if t >= load_end), default=rss[-1][1])
        max_rss = max(v for _, v in rss)

        # SIGTERM with requests in flight: they must end properly, the server must exit 0.
        inflight = [asyncio.create_task(state.one(client)) for _ in range(8)]
        await asyncio.sleep(0.5)
        srv.proc.send_signal(15)
        exit_code = await asyncio.to_thread(_wait, srv, SHUTDOWN_TIMEOUT_S + 20)
        await asyncio.gather(*inflight)
    if exit_code != 0:
        state.fail("hang" if exit_code is None else "shutdown", f"exit code {exit_code}")
    growth = (end_rss - start_rss) / start_rss
    if growth > LEAK_RATIO:
        state.fail("leak", f"RSS grew {growth:.1%} ({start_rss} -> {end_rss} bytes)")
    return {
        "minutes": minutes,
        "seed": seed,
        "requests": sum(state.outcomes.values()) + sum(state.failures.values()),
        "outcomes": dict(state.outcomes),
        "failures": dict(state.failures),
        "examples": state.examples,
        "rss_mib": {
            "start": round(start_rss / 2**20, 1),
            "end": round(end_rss / 2**20, 1),
            "max": round(max_rss / 2**20, 1),
        },
        "rss_growth": round(growth, 4),
        "rss_series_mib": [(round(t - t0, 1), round(v / 2**20, 1)) for t, v in rss],
        "shutdown_exit_code": exit_code,
    }


def warmup_s(duration: float) -> float:
    return min(max(WARMUP_FRACTION * duration, WARMUP_MIN_S), duration / 2)


def _wait(srv: ServerProcess, timeout: float) -> int | None:
    assert srv.proc is not None
    try:
        return srv.proc.wait(timeout)
    except Exception:
        return None


def _gauge(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.soak",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--minutes", type=float, required=True, help="length of the load")
    p.add_argument("--config", default=None, help="family YAML (default: the demo family)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    p.add_argument(
        "--request-timeout",
        type=float,
        default=120.0,
        help="a request without an answer after this long is a hang",
    )
    p.add_argument("--threads", type=int, default=None, help="passed to eft-serve")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    print(
        "reproduce: python -m loadtest.soak " + " ".join(argv if argv is not None else sys.argv[1:])
    )
    from server.cli import default_config

    config = args.config or default_config()
    extra = ["--threads", str(args.threads)] if args.threads else []
    srv = ServerProcess(
        config,
        "--max-batch-size",
        "16",
        "--max-waiting",
        "32",
        "--shutdown-timeout",
        str(SHUTDOWN_TIMEOUT_S),
        "--log-level",
        "warning",
        *extra,
    )
    srv.start()
    try:
        result = asyncio.run(soak(srv, args.minutes, args.seed, args.request_timeout))
    finally:
        srv.stop()
    rss = result["rss_mib"]
    print(f"{result['requests']} requests in {args.minutes:g} min: {result['outcomes']}")
    print(f"failures: {result['failures'] or 'none'}")
    for ex in result["examples"]:
        print(f"  {ex}")
    print(
        f"server RSS MiB: start {rss['start']} (after {warmup_s(args.minutes * 60):.0f} s), "
        f"end {rss['end']}, max {rss['max']}; growth {result['rss_growth']:.2%}; "
        f"exit after SIGTERM: {result['shutdown_exit_code']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
