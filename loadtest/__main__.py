"""`python -m loadtest`: stream requests at an eft-serve (or any OpenAI) server and report.

    python -m loadtest --url http://127.0.0.1:8000 --concurrency 16 --requests 200 \\
        --max-tokens 64 --knobs mixed --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import httpx

from evals.outputs import matplotlib_missing, prepare
from loadtest.client import LoadtestError, check_loopback
from loadtest.report import format_summary, plot_runs
from loadtest.runner import LoadConfig, run_load


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Load generator for eft-serve: streams OpenAI requests and reports TTFT, "
        "inter-token latency, end-to-end latency and throughput (vLLM bench serve definitions).",
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    mode = p.add_argument_group("load shape (give --concurrency, --rate, or both)")
    mode.add_argument(
        "--concurrency",
        type=positive_int,
        help="closed loop: this many requests in flight (with --rate: a cap)",
    )
    mode.add_argument(
        "--rate", type=positive_float, help="open loop: Poisson arrivals at this many requests/s"
    )
    p.add_argument("--requests", type=positive_int, default=100, help="requests to send")
    p.add_argument(
        "--duration",
        type=positive_float,
        default=600.0,
        help="seconds after which no request starts (default 600)",
    )
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=300.0,
        help="seconds one request may take (default 300)",
    )
    p.add_argument("--warmup", type=int, default=0, help="unmeasured requests sent first")
    p.add_argument(
        "--max-tokens", type=positive_int, default=64, help="output tokens per request (default 64)"
    )
    p.add_argument(
        "--range-ratio",
        type=float,
        default=0.0,
        help="output lengths uniform in [K(1-r), K(1+r)] for K = --max-tokens (default 0: "
        "exactly K); desynchronises a closed loop so requests join running batches",
    )
    p.add_argument(
        "--prompt-len",
        type=positive_int,
        default=32,
        help="approximate prompt length in tokens (calibrated with /tokenize)",
    )
    p.add_argument(
        "--knobs",
        choices=("fixed", "mixed"),
        default="fixed",
        help="fixed: the same knobs for every request (--eft, or the family's "
        "defaults); mixed: helpful=λ, harmless=1-λ with λ~U(0,1) per request",
    )
    p.add_argument(
        "--eft",
        type=json.loads,
        default=None,
        metavar="JSON",
        help="knobs for --knobs fixed, e.g. '{\"helpful\": 1.0}'",
    )
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    p.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature (default 1)"
    )
    p.add_argument(
        "--logprobs",
        action="store_true",
        help="ask for each token's log-prob, which makes the server stream one chunk per token "
        "(otherwise text it holds back, e.g. half a UTF-8 character, merges tokens into a chunk)",
    )
    p.add_argument("--api-key", default=None, help="Bearer token for the server's --api-key")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the prompts, output lengths and knobs; request i samples with seed + i "
        "(default 0)",
    )
    p.add_argument("--model", default=None, help="default: the first id of GET /v1/models")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write the summary as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="latency CDFs + throughput over time")
    p.add_argument(
        "--allow-remote", action="store_true", help="allow a non-loopback --url (off by default)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    if not args.concurrency and not args.rate:
        p.error("give --concurrency N (closed loop) or --rate R (open loop)")
    if not 0.0 <= args.range_ratio < 1.0:
        p.error("--range-ratio must be in [0, 1)")
    if args.knobs == "mixed" and args.eft:
        p.error("--eft sets fixed knobs; it cannot go with --knobs mixed")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot and matplotlib_missing("python -m loadtest", "--plot"):
        return 2
    for path in (args.json_out, args.plot):
        if path:
            prepare(path)
    try:
        if not args.allow_remote:
            check_loopback(args.url)
        cfg = LoadConfig(
            url=args.url,
            concurrency=args.concurrency,
            rate=args.rate,
            requests=args.requests,
            duration=args.duration,
            timeout=args.timeout,
            max_tokens=args.max_tokens,
            range_ratio=args.range_ratio,
            prompt_len=args.prompt_len,
            knobs=args.knobs,
            fixed_knobs=args.eft,
            chat=args.chat,
            api_key=args.api_key,
            seed=args.seed,
            model=args.model,
            temperature=args.temperature,
            warmup=args.warmup,
            logprobs=args.logprobs,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
        run = asyncio.run(run_load(cfg))
    except (LoadtestError, httpx.HTTPError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    summary = run.summary()
    print(format_summary(summary))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2) + "\n")
    if args.plot:
        plot_runs({f"c={cfg.concurrency or '-'} rate={cfg.rate or 'inf'}": run}, args.plot)
    # Non-zero when nothing succeeded, so scripts notice a dead server.
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
