"""Human-readable summary (laid out like `vllm bench serve`'s) and the optional plot."""

from __future__ import annotations

from pathlib import Path

from loadtest.runner import LoadRun
from loadtest.stats import throughput_timeline

WIDTH = 50


def format_summary(summary: dict, title: str = "Serving Benchmark Result") -> str:
    cfg = summary.get("config", {})
    lines = [f"{' ' + title + ' ':=^{WIDTH}}"]

    def row(label: str, value: object, fmt: str = "") -> None:
        lines.append(f"{label:<38}{value:>{12}{fmt}}")

    row("Model:", str(cfg.get("model", "?")))
    if cfg.get("rate"):
        row("Request rate (req/s, Poisson):", cfg["rate"], ".2f")
    if cfg.get("concurrency"):
        row("Max concurrency:", cfg["concurrency"])
    row("Knobs:", str(cfg.get("knobs", "?")))
    row("Successful requests:", summary["completed"])
    row("Failed requests:", summary["errors"])
    if summary.get("not_sent"):
        row("Not sent (--duration reached):", summary["not_sent"])
    row("Benchmark duration (s):", summary["duration_s"], ".2f")
    row("Total input tokens:", summary["total_prompt_tokens"])
    row("Total generated tokens:", summary["total_output_tokens"])
    row("Request throughput (req/s):", summary["request_throughput"], ".2f")
    row("Output token throughput (tok/s):", summary["output_token_throughput"], ".2f")
    for key, name in (
        ("ttft_ms", "Time to First Token"),
        ("tpot_ms", "Time per Output Token (excl. 1st token)"),
        ("itl_ms", "Inter-token Latency"),
        ("e2e_ms", "End-to-end Latency"),
    ):
        stats = summary[key]
        lines.append(f"{' ' + name + ' ':-^{WIDTH}}")
        short = key.split("_")[0].upper()
        row(f"Mean {short} (ms):", stats["mean"], ".2f")
        for q in ("p50", "p90", "p99"):
            row(f"{q.upper()} {short} (ms):", stats[q], ".2f")
    if summary["errors"]:
        lines.append(f"{' Errors by status ':-^{WIDTH}}")
        for status, count in summary["errors_by_status"].items():
            row(f"{status}:", count)
        for example in summary.get("error_examples", []):
            lines.append(f"  e.g. {example}")
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def plot_runs(runs: dict[str, LoadRun], out: str | Path) -> None:
    """Latency CDFs (TTFT, ITL, e2e) and output tokens/s over time, one line per run."""
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [
        (axes[0][0], "TTFT (ms)", lambda r: [x.ttft for x in r.results if x.ok and x.ttft]),
        (
            axes[0][1],
            "Inter-token latency (ms)",
            lambda r: [g for x in r.results if x.ok for g in x.itl],
        ),
        (
            axes[1][0],
            "End-to-end latency (ms)",
            lambda r: [x.e2e for x in r.results if x.ok and x.e2e],
        ),
    ]
    for ax, label, pick in panels:
        for name, run in runs.items():
            xs = sorted(v * 1000 for v in pick(run))
            if xs:
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, where="post", label=name)
        ax.set_xscale("log")  # latencies span decades between concurrency 1 and 32
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on a log axis
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
    ax = axes[1][1]
    for name, run in runs.items():
        # ~40 bins per run: 1 s bins are jumpy when one decoding step takes about a second
        ts, tput = throughput_timeline(run.results, run.t0, bin_s=max(1.0, run.duration / 40))
        if ts:
            ax.plot(ts, tput, label=name)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3)
    for ax in (axes[0][0], axes[1][1]):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
