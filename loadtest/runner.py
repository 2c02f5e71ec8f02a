"""Drive many streamed requests: a closed loop (fixed concurrency) or an open Poisson loop.

Every run is bounded twice: by a request count and by wall time. Past `duration` no new request
starts; requests still in flight get `timeout` more seconds, then are cancelled and counted as
errors, so a hung server can never hang the tool.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass, field

import httpx
from tqdm import tqdm

from loadtest.client import auth_headers, base_url, build_body, first_model, stream_request
from loadtest.prompts import make_knobs, make_prompts, tokens_per_word
from loadtest.stats import RequestResult, summarize

MAX_INFLIGHT = 1024  # open loop: hard cap on concurrent requests (and sockets)


@dataclass
class LoadConfig:
    url: str = "http://127.0.0.1:8000"
    concurrency: int | None = None  # closed loop; with `rate`, a cap on in-flight requests
    rate: float | None = None  # requests/s, Poisson arrivals (open loop)
    requests: int = 100
    duration: float = 600.0  # seconds; no request starts after this
    timeout: float = 300.0  # seconds per request (and the grace after `duration`)
    max_tokens: int = 64
    # Output lengths uniform in [K(1-r), K(1+r)] (vLLM's --random-range-ratio). With r > 0
    # requests stop at different steps, so in a closed loop new ones join a running batch
    # instead of whole waves starting and ending together.
    range_ratio: float = 0.0
    prompt_len: int = 32
    knobs: str = "fixed"
    fixed_knobs: dict[str, float] | None = None  # `--eft`; None: the family's defaults
    chat: bool = False
    api_key: str | None = None
    seed: int = 0
    model: str | None = None
    temperature: float = 1.0
    logprobs: bool = False  # ask for the chosen token's log-prob: one chunk per token
    warmup: int = 0  # requests sent (and discarded) before measuring
    progress: bool = True
    # Explicit requests as (prompt, max_tokens); replaces `requests`, `prompt_len`,
    # `max_tokens` and `range_ratio` (the benchmarks' mixed workload).
    workload: list[tuple[str, int]] | None = None


@dataclass
class LoadRun:
    config: LoadConfig
    results: list[RequestResult]
    t0: float
    duration: float
    model: str
    tok_per_word: float
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        out = summarize(self.results, self.duration)
        cfg = asdict(self.config)
        cfg.pop("api_key", None)  # never write a secret into a results file
        if cfg["workload"] is not None:
            cfg["workload"] = f"{len(cfg['workload'])} explicit requests"
        cfg["model"] = self.model
        out["config"] = cfg
        out.update(self.extra)
        return out


async def run_load(cfg: LoadConfig, transport: httpx.AsyncBaseTransport | None = None) -> LoadRun:
    """Run one load test; `transport` lets tests substitute an in-process server."""
    if not cfg.concurrency and not cfg.rate:
        raise ValueError("give --concurrency (closed loop) or --rate (open loop)")
    url = base_url(cfg.url)
    limit = min(cfg.concurrency or MAX_INFLIGHT, MAX_INFLIGHT)
    limits = httpx.Limits(max_connections=limit + 4, max_keepalive_connections=limit + 4)
    timeout = httpx.Timeout(cfg.timeout, connect=30.0)
    async with httpx.AsyncClient(
        headers=auth_headers(cfg.api_key),
        limits=limits,
        timeout=timeout,
        trust_env=False,
        transport=transport,
    ) as client:
        model = cfg.model or await first_model(client, url)
        rng = random.Random(cfg.seed)
        tpw = await tokens_per_word(client, url, model, rng)
        if cfg.workload is not None:
            n = len(cfg.workload)
            prompts = [p for p, _ in cfg.workload]
            lengths = [k for _, k in cfg.workload]
        else:
            n = cfg.requests + cfg.warmup
            prompts = make_prompts(n, cfg.prompt_len, tpw, cfg.seed)
            lengths = output_lengths(n, cfg.max_tokens, cfg.range_ratio, cfg.seed)
        knobs = make_knobs(n, cfg.knobs, cfg.seed, cfg.fixed_knobs)
        bodies = [
            build_body(model, p, k_out, cfg.chat, k, cfg.temperature, cfg.seed + i, cfg.logprobs)
            for i, (p, k, k_out) in enumerate(zip(prompts, knobs, lengths, strict=True))
        ]
        warm, bodies = bodies[: cfg.warmup], bodies[cfg.warmup :]
        if warm:
            await asyncio.gather(*(stream_request(client, url, b, cfg.chat) for b in warm))
        results, t0, t1 = await _drive(client, url, bodies, cfg, limit)
    # Requests the --duration bound kept from starting: not errors, but worth seeing.
    extra = {"not_sent": len(bodies) - len(results)}
    return LoadRun(cfg, results, t0, t1 - t0, model, tpw, extra)


def output_lengths(n: int, max_tokens: int, range_ratio: float, seed: int) -> list[int]:
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), not {range_ratio}")
    rng = random.Random(seed + 3)
    lo = max(1, round(max_tokens * (1 - range_ratio)))
    hi = max(lo, round(max_tokens * (1 + range_ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


async def _drive(
    client: httpx.AsyncClient, url: str, bodies: list[dict], cfg: LoadConfig, limit: int
) -> tuple[list[RequestResult], float, float]:
    bar = tqdm(
        total=len(bodies),
        desc="requests",
        unit="req",
        disable=not cfg.progress,
        dynamic_ncols=True,
        leave=False,
    )
    results: list[RequestResult] = []
    t0 = time.perf_counter()
    deadline = t0 + cfg.duration

    async def one(body: dict) -> None:
        try:
            res = await asyncio.wait_for(stream_request(client, url, body, cfg.chat), cfg.timeout)
        except asyncio.TimeoutError:
            res = RequestResult(
                start=time.perf_counter(),
                status="timeout",
                error=f"no end after {cfg.timeout:.0f} s",
            )
        results.append(res)
        bar.update(1)

    if cfg.rate:
        await _open_loop(bodies, cfg, limit, deadline, one)
    else:
        await _closed_loop(bodies, limit, deadline, one)
    t1 = time.perf_counter()
    bar.close()
    return results, t0, t1


async def _closed_loop(bodies: list[dict], concurrency: int, deadline: float, one) -> None:
    """`concurrency` workers, each sending its next request as soon as the last one ended."""
    queue = iter(bodies)

    async def worker() -> None:
        for body in queue:  # one shared iterator: each body goes to exactly one worker
            if time.perf_counter() >= deadline:
                return
            await one(body)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _open_loop(bodies: list[dict], cfg: LoadConfig, limit: int, deadline: float, one) -> None:
    """Poisson arrivals at `cfg.rate`; in-flight requests capped at `limit`.

    Arrival times are drawn up front from one seeded RNG and slept to on an absolute schedule,
    so a slow event loop does not lower the offered rate.
    """
    rng = random.Random(cfg.seed + 2)
    sem = asyncio.Semaphore(limit)
    start = time.perf_counter()
    t = 0.0
    tasks: list[asyncio.Task] = []

    async def gated(body: dict) -> None:
        async with sem:
            await one(body)

    for body in bodies:
        t += rng.expovariate(cfg.rate)
        delay = start + t - time.perf_counter()
        if start + t >= deadline:
            break
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(gated(body)))
    if tasks:
        await asyncio.gather(*tasks)
