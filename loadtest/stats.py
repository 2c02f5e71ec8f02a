"""Per-request timings and the summary statistics computed from them.

Definitions follow `vllm bench serve` (reference/serving_anchors.md §3), so figures are
comparable with vLLM's:
- TTFT: request sent -> first streamed chunk that carries a token.
- ITL: every gap between successive token-carrying chunks (pooled over all requests).
- TPOT per request: (e2e - TTFT) / (output_tokens - 1).
- e2e: request sent -> stream finished.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """What one streamed request measured. Times are `time.perf_counter()` seconds."""

    start: float
    ok: bool = False
    status: str = ""  # HTTP status as text, or a client-side reason ("timeout", "connect", ...)
    error: str = ""
    ttft: float | None = None  # seconds
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)  # gaps between token chunks, seconds
    token_times: list[float] = field(default_factory=list)  # absolute, one per token chunk
    output_tokens: int = 0  # from usage when the server sent it, else counted from chunks
    chunks: int = 0  # token-carrying chunks (< output_tokens when chunks merge tokens)
    prompt_tokens: int = 0

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, the same as numpy's default (`method="linear"`).

    Kept in pure Python so the math is unit-testable by hand and needs no numpy.
    """
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def describe_ms(seconds: Iterable[float]) -> dict[str, float]:
    """`mean`, `p50`, `p90`, `p99` in milliseconds; zeros for an empty sample (as vLLM)."""
    ms = [s * 1000.0 for s in seconds]
    out = {"mean": sum(ms) / len(ms) if ms else 0.0}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(ms, q)
    return out


def summarize(results: Sequence[RequestResult], duration: float) -> dict:
    """The load tool's JSON (the documented keys plus extras) from per-request results."""
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    duration = max(duration, 1e-9)
    by_status = Counter(r.status or "unknown" for r in failed)
    return {
        "completed": len(done),
        "errors": len(failed),
        "errors_by_status": dict(sorted(by_status.items())),
        "error_examples": sorted({f"{r.status}: {r.error}"[:300] for r in failed})[:5],
        "duration_s": duration,
        "total_output_tokens": out_tokens,
        "total_prompt_tokens": sum(r.prompt_tokens for r in done),
        # > 1 means some chunks carried several tokens, so ITL gaps span several steps
        "tokens_per_chunk": out_tokens / max(1, sum(r.chunks for r in done)),
        "request_throughput": len(done) / duration,
        "output_token_throughput": out_tokens / duration,
        "ttft_ms": describe_ms(r.ttft for r in done if r.ttft is not None),
        "tpot_ms": describe_ms(t for r in done if (t := r.tpot) is not None),
        "itl_ms": describe_ms(g for r in done for g in r.itl),
        "e2e_ms": describe_ms(r.e2e for r in done if r.e2e is not None),
    }


def throughput_timeline(
    results: Sequence[RequestResult], t0: float, bin_s: float = 1.0
) -> tuple[list[float], list[float]]:
    """Output tokens/s in `bin_s`-wide bins from t0, from the token chunk timestamps.

    A chunk may carry several tokens (speculative decoding); spreading a request's counted
    tokens evenly over its chunks keeps the total right.
    """
    bins: Counter[int] = Counter()
    for r in results:
        if not r.ok or not r.token_times:
            continue
        per_chunk = r.output_tokens / len(r.token_times)
        for t in r.token_times:
            bins[int((t - t0) // bin_s)] += per_chunk
    if not bins:
        return [], []
    n = max(bins) + 1
    return [i * bin_s for i in range(n)], [bins.get(i, 0) / bin_s for i in range(n)]
