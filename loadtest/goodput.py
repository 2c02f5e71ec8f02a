"""Goodput (DistServe): requests per second that finish within BOTH latency objectives.

    python -m loadtest.goodput --url http://127.0.0.1:8000 --rates 1,2,4,8 \\
        --ttft-slo-ms 500 --itl-slo-ms 50 --json out.json

Throughput counts every token however late; a server that answers everything slowly looks busy
and useful. Goodput counts only requests a user would call served: time to first token within
`--ttft-slo-ms` AND mean inter-token latency within `--itl-slo-ms`. Requests arrive as a seeded
Poisson process at each `--rate`/`--rates` value and carry the benchmarks' mixed workload
(`loadtest.prompts.mixed_workload`: prompts of 4-60 words, 8-128 output tokens, log-uniform),
streamed, so each request's TTFT and token times are measured by `loadtest.client`.

Per rate: goodput = requests meeting both objectives / the run's wall time, and attainment =
that count / requests sent (a failed request misses both; "unsent" are requests the
`--duration` cap kept from starting). The reported `goodput` is the best over the swept rates.
DistServe's own summary, the highest rate whose attainment reaches a target (`--attainment`,
0.9), is reported next to it as `max_rate_at_attainment`.

A request's mean ITL is (last token time - first token time) / (output tokens - 1): a per-token
figure whether or not the server merged tokens into one chunk. A one-token answer has no gap and
meets the ITL objective trivially.

Bounded: each rate sends at most `--requests`, starts none after `--duration` seconds, and
cancels (and counts as failed) any request still running `--timeout` seconds after it started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from loadtest.client import LoadtestError, check_loopback
from loadtest.prompts import mixed_workload
from loadtest.runner import LoadConfig, run_load
from loadtest.stats import RequestResult, percentile


@dataclass(frozen=True)
class Slo:
    ttft_ms: float
    itl_ms: float

    def meets(self, rec: dict) -> bool:
        if not rec["ok"] or rec["ttft_ms"] is None:
            return False
        itl = rec["mean_itl_ms"]
        return rec["ttft_ms"] <= self.ttft_ms and (itl is None or itl <= self.itl_ms)


def request_record(r: RequestResult) -> dict:
    """What the objectives are judged on, in milliseconds (None where there is nothing)."""
    ttft = r.ttft * 1e3 if r.ttft is not None else None
    itl = None
    if r.ok and r.output_tokens >= 2 and len(r.token_times) >= 2:
        itl = 1e3 * (r.token_times[-1] - r.token_times[0]) / (r.output_tokens - 1)
    return {"ok": r.ok, "ttft_ms": ttft, "mean_itl_ms": itl, "output_tokens": r.output_tokens}


def account(records: list[dict], duration_s: float, slo: Slo) -> dict:
    """Goodput and attainment of one run's per-request records."""
    sent = len(records)
    done = [r for r in records if r["ok"]]
    good = sum(slo.meets(r) for r in records)
    duration_s = max(duration_s, 1e-9)
    ttft = [r["ttft_ms"] for r in done if r["ttft_ms"] is not None]
    itl = [r["mean_itl_ms"] for r in done if r["mean_itl_ms"] is not None]
    return {
        "sent": sent,
        "completed": len(done),
        "good": good,
        "ttft_met": sum(r["ttft_ms"] is not None and r["ttft_ms"] <= slo.ttft_ms for r in done),
        "itl_met": sum(r["mean_itl_ms"] is None or r["mean_itl_ms"] <= slo.itl_ms for r in done),
        "attainment": good / sent if sent else 0.0,
        "duration_s": duration_s,
        "request_throughput": len(done) / duration_s,
        "goodput": good / duration_s,
        "ttft_ms": {f"p{q}": percentile(ttft, q) for q in (50, 90, 99)},
        "mean_itl_ms": {f"p{q}": percentile(itl, q) for q in (50, 90, 99)},
    }


async def run_rate(
    url: str,
    rate: float,
    slo: Slo,
    requests: int,
    seed: int,
    duration: float,
    timeout: float,
    tokens: tuple[int, int] = (8, 128),
) -> dict:
    """One Poisson run at `rate` req/s; the same seeded workload at every rate."""
    cfg = LoadConfig(
        url=url,
        rate=rate,
        duration=duration,
        timeout=timeout,
        seed=seed,
        progress=False,
        workload=mixed_workload(requests, seed, tokens=tokens),
    )
    run = await run_load(cfg)
    out = account([request_record(r) for r in run.results], run.duration, slo)
    out["rate"] = rate
    out["not_sent"] = run.extra["not_sent"]
    return out


def summarize_sweep(per_rate: list[dict], slo: Slo, attainment: float) -> dict:
    best = max(per_rate, key=lambda r: r["goodput"])
    reaching = [r["rate"] for r in per_rate if r["attainment"] >= attainment]
    return {
        "goodput": best["goodput"],
        "best_rate": best["rate"],
        "slo": {"ttft_ms": slo.ttft_ms, "itl_ms": slo.itl_ms},
        "attainment_target": attainment,
        "max_rate_at_attainment": max(reaching) if reaching else None,
        "per_rate": per_rate,
    }


def format_report(res: dict) -> str:
    slo = res["slo"]
    lines = [
        f"objectives: TTFT <= {slo['ttft_ms']:g} ms and mean ITL <= {slo['itl_ms']:g} ms",
        f"{'rate':>6} {'sent':>5} {'unsent':>6} {'done':>5} {'good':>5} {'attain':>7} "
        f"{'goodput':>8} {'TTFT p50/p90 ms':>17} {'ITL p50/p90 ms':>16}",
    ]
    for r in res["per_rate"]:
        lines.append(
            f"{r['rate']:>6g} {r['sent']:>5} {r['not_sent']:>6} {r['completed']:>5} "
            f"{r['good']:>5} {100 * r['attainment']:>6.1f}% {r['goodput']:>8.2f} "
            f"{r['ttft_ms']['p50']:>8.1f}/{r['ttft_ms']['p90']:<8.1f} "
            f"{r['mean_itl_ms']['p50']:>7.1f}/{r['mean_itl_ms']['p90']:<8.1f}"
        )
    reach = res["max_rate_at_attainment"]
    lines.append(
        f"goodput: {res['goodput']:.2f} req/s (at rate {res['best_rate']:g} req/s); "
        f"highest rate with >= {100 * res['attainment_target']:g}% attainment: "
        + (f"{reach:g} req/s" if reach is not None else "none")
    )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.goodput", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (loopback)")
    p.add_argument("--rate", type=float, help="Poisson arrivals, requests/s")
    p.add_argument("--rates", help="comma-separated rates to sweep, e.g. 1,2,4,8")
    p.add_argument("--ttft-slo-ms", type=float, required=True, help="time-to-first-token SLO")
    p.add_argument("--itl-slo-ms", type=float, required=True, help="mean inter-token SLO")
    p.add_argument("--attainment", type=float, default=0.9, help="DistServe target (0.9)")
    p.add_argument("--requests", type=int, default=48, help="requests per rate (48)")
    p.add_argument(
        "--output-tokens",
        default="8,128",
        help="LO,HI output tokens per request, log-uniform (default 8,128)",
    )
    p.add_argument(
        "--duration", type=float, default=120.0, help="s per rate after which none starts (120)"
    )
    p.add_argument("--timeout", type=float, default=120.0, help="s one request may take (120)")
    p.add_argument("--seed", type=int, default=0, help="workload and arrival seed (0)")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write the results as JSON")
    args = p.parse_args(argv)
    if (args.rate is None) == (args.rates is None):
        p.error("give exactly one of --rate R or --rates R1,R2,...")
    try:
        args.rate_list = (
            [args.rate] if args.rates is None else [float(x) for x in args.rates.split(",")]
        )
        lo, hi = (int(x) for x in args.output_tokens.split(","))
    except ValueError as exc:
        p.error(str(exc))
    if not all(r > 0 for r in args.rate_list):
        p.error("rates must be > 0")
    if not 1 <= lo <= hi:
        p.error("--output-tokens needs 1 <= LO <= HI")
    args.tokens = (lo, hi)
    if args.requests < 1 or args.duration <= 0 or args.timeout <= 0:
        p.error("--requests, --duration and --timeout must be positive")
    return args


async def sweep(args: argparse.Namespace, slo: Slo) -> list[dict]:
    out = []
    for rate in args.rate_list:
        res = await run_rate(args.url, rate, slo, args.requests, args.seed, args.duration,
                             args.timeout, args.tokens)  # fmt: skip
        print(f"rate {rate:g}: goodput {res['goodput']:.2f} req/s, attainment "
              f"{100 * res['attainment']:.1f}%", file=sys.stderr, flush=True)  # fmt: skip
        out.append(res)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "loadtest.goodput", *argv])
    print(f"command: {command}", flush=True)
    slo = Slo(args.ttft_slo_ms, args.itl_slo_ms)
    try:
        check_loopback(args.url)
        per_rate = asyncio.run(sweep(args, slo))
    except (LoadtestError, httpx.HTTPError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    res = {"command": command, "url": args.url, **summarize_sweep(per_rate, slo, args.attainment)}
    print(format_report(res))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=2) + "\n")
    return 0 if any(r["completed"] for r in per_rate) else 1


if __name__ == "__main__":
    sys.exit(main())
