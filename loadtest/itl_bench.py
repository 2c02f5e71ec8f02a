"""Inter-token latency under Poisson arrivals, `--prefill-share` on and off, side by side.

    python -m loadtest.itl_bench [--config FAMILY.yaml] [--requests 24] [--rate 0.21]

Starts `eft-serve` twice on the same family (default: the bench's perf family, built by
`python -m loadtest.bench`), with `--prefill-share 1` (the default: while rows decode, a step
prefills at most one prompt token per decoding row) and `--prefill-share 0` (only the step
budget), speculation off, and sends the bench's mixed workload (prompts of 4-60 words, outputs
of 8-128 tokens) with Poisson arrivals, at most 16 in flight. Prints ITL p50/p99, their ratio,
TTFT p50 and output tokens/s of each, and the command.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from loadtest.bench import FULL, MIXED_SEED, load
from loadtest.prompts import mixed_workload
from loadtest.server_proc import BenchServer

PERF = Path.home() / ".cache" / "eft-serve" / "perf-family" / "family.yaml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.itl_bench",
                                 description=__doc__.split("\n\n")[0])  # fmt: skip
    ap.add_argument("--config", default=str(PERF), help="family YAML (default: the perf family)")
    ap.add_argument("--requests", type=int, default=24, help="requests of the mixed workload")
    ap.add_argument("--rate", type=float, default=0.21, help="Poisson arrivals per second")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    print(f"command: python -m loadtest.itl_bench {' '.join(argv or sys.argv[1:])}".rstrip())
    workload = mixed_workload(max(args.requests, 1), MIXED_SEED + 1)[: args.requests]
    res = {}
    logs = tempfile.mkdtemp(prefix="itl-bench-")
    for share in ("1", "0"):
        flags = ["--threads", "1", "--prefill-share", share, "--speculative", "off"]
        server = BenchServer(args.config, f"{logs}/eft-serve-{share}.log", 32, flags)
        server.start()
        try:
            run = load(server, FULL, 16, len(workload), duration=600, workload=workload,
                       rate=args.rate)  # fmt: skip
        finally:
            server.stop()
        s = run.summary()
        res[f"prefill_share_{share}"] = r = {
            "itl_p50_ms": s["itl_ms"]["p50"],
            "itl_p99_ms": s["itl_ms"]["p99"],
            "itl_p99_over_p50": s["itl_ms"]["p99"] / s["itl_ms"]["p50"],
            "ttft_p50_ms": s["ttft_ms"]["p50"],
            "output_tok_s": s["output_token_throughput"],
            "completed": s["completed"],
            "errors": s["errors"],
        }
        print(f"  --prefill-share {share}: ITL p50 {r['itl_p50_ms']:.0f} ms, p99 "
              f"{r['itl_p99_ms']:.0f} ms (p99/p50 {r['itl_p99_over_p50']:.2f}), TTFT p50 "
              f"{r['ttft_p50_ms']:.0f} ms, {r['output_tok_s']:.1f} tok/s")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
