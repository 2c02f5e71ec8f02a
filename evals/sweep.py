"""`eft-sweep`: measure scorers over a grid of EFT knobs, on any family, through the API.

    eft-sweep --url http://127.0.0.1:8000 --model demo \\
        --prompts benign=benign.jsonl --prompts restricted=restricted.jsonl \\
        --grid "helpful=0:1:0.25" --grid "harmless=1-helpful" \\
        --scorer refusal --scorer contains --json out.json --csv out.csv --plot out.png

For every grid point (and every `--model`) it sends each prompt (K times with `--samples K`),
scores the answers and records, per prompt file and scorer, the mean over prompts with a 95%
interval (docs/sweeps.md). The JSON is rewritten after every point, and a rerun with the same
--json skips the points it already holds (same model, knobs, sampling settings, prompt files and
scorers); `--fresh` starts over.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evals.client import MAX_N, Client, Sampling, SweepError
from evals.grid import GridError, parse_grid
from evals.outputs import default_out, matplotlib_missing, prepare
from evals.prompts import Item, PromptError, PromptSet, load_prompts
from evals.scorers import Scorer, ScorerError, parse_scorer
from evals.stats import summarize

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Point:
    """One configuration to measure: a model id and the `eft` object to send (None: none)."""

    model: str
    eft: dict[str, Any] | None = None
    name: str | None = None  # a row label; default: the model and knobs

    def label(self) -> str:
        if self.name:
            return self.name
        knobs = ",".join(f"{k}={v}" for k, v in (self.eft or {}).items())
        return f"{self.model}" + (f" [{knobs}]" if knobs else "")


def point_key(
    point: Point, sampling: Sampling, sets: Sequence[PromptSet], scorers: Sequence[Scorer]
) -> str:
    """Everything that determines a point's numbers, as a short hash (the resume key)."""
    blob = json.dumps(
        {
            "model": point.model,
            "eft": point.eft,
            "sampling": sampling.as_dict(),
            "prompts": {s.label: s.sha256 for s in sets},
            "scorers": [sc.spec or sc.name for sc in scorers],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _chunks(samples: int) -> list[int]:
    return [min(MAX_N, samples - i) for i in range(0, samples, MAX_N)]


def _request_eft(point: Point, scorers: Sequence[Scorer]) -> dict[str, Any] | None:
    if not any(s.needs_trace for s in scorers):
        return point.eft
    return {**(point.eft or {}), "trace": True}


def measure(
    client: Client,
    pool: ThreadPoolExecutor,
    point: Point,
    sets: Sequence[PromptSet],
    scorers: Sequence[Scorer],
    sampling: Sampling,
    tick: Callable[[int], None] = lambda n: None,
) -> dict[str, Any]:
    """Send every prompt of every set for one point (concurrently) and score the answers.

    Returns {"results": {label: {scorer: {mean, lo, hi, n}}}, "answers": {label: [{id, texts,
    finish_reasons, scores: {scorer: [per sample]}}]}}.
    """
    eft = _request_eft(point, scorers)
    jobs: list[tuple[PromptSet, Item, Any]] = []
    for s in sets:
        for item in s.items:
            futures = []
            for c, n in enumerate(_chunks(sampling.samples)):
                seed = None if sampling.seed is None else sampling.seed + c
                f = pool.submit(client.choices, point.model, item, eft, sampling, n, seed)
                f.add_done_callback(lambda _f, n=n: tick(n))
                futures.append(f)
            jobs.append((s, item, futures))
    results: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[dict[str, Any]]] = {}
    per: dict[str, dict[str, list[list[float]]]] = {
        s.label: {sc.name: [] for sc in scorers} for s in sets
    }
    try:
        for s, item, futures in jobs:
            choices = [c for f in futures for c in f.result()]
            record = item.as_dict()
            scores = {}
            for sc in scorers:
                scores[sc.name] = [sc(record, c) for c in choices]
                per[s.label][sc.name].append([v for v in scores[sc.name] if v is not None])
            answers.setdefault(s.label, []).append(
                {
                    "id": item.id,
                    "texts": [c.get("text") for c in choices],
                    "finish_reasons": [c.get("finish_reason") for c in choices],
                    "scores": scores,
                }
            )
    except BaseException:
        for _, _, futures in jobs:
            for f in futures:
                f.cancel()
        raise
    for label, by_scorer in per.items():
        results[label] = {name: summarize(values) for name, values in by_scorer.items()}
    return {"results": results, "answers": answers}


class SweepFile:
    """The JSON output, rewritten (atomically) after every point; the resume state."""

    def __init__(self, path: str | Path | None, header: dict[str, Any], fresh: bool = False):
        self.path = Path(path) if path else None
        self.data: dict[str, Any] = {"version": FORMAT_VERSION, **header, "points": []}
        if self.path and self.path.exists() and not fresh:
            try:
                old = json.loads(self.path.read_text())
            except json.JSONDecodeError as exc:
                raise SweepError(f"{self.path} is not a sweep JSON ({exc}); use --fresh") from exc
            if old.get("version") != FORMAT_VERSION or not isinstance(old.get("points"), list):
                raise SweepError(f"{self.path} is not a sweep JSON of this version; use --fresh")
            self.data["points"] = old["points"]

    def done(self) -> dict[str, dict[str, Any]]:
        return {p["key"]: p for p in self.data["points"]}

    def add(self, record: dict[str, Any]) -> None:
        self.data["points"] = [p for p in self.data["points"] if p["key"] != record["key"]]
        self.data["points"].append(record)
        self.write()

    def finish(self, records: Sequence[dict[str, Any]]) -> None:
        """The finished run's points, in its order (points of other settings are dropped)."""
        self.data["points"] = [{k: v for k, v in r.items() if k != "_answers"} for r in records]
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def run_sweep(
    client: Client,
    points: Sequence[Point],
    sets: Sequence[PromptSet],
    scorers: Sequence[Scorer],
    sampling: Sampling,
    out: SweepFile,
    concurrency: int = 16,
    keep_answers: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> list[dict[str, Any]]:
    """Measure every point not already in `out`; returns the records of `points`, in order.

    A record: {key, name, model, eft, results, seconds} (+ answers with `keep_answers`; the
    in-memory records always carry them under `_answers` for callers that print examples).
    """
    names = [sc.name for sc in scorers]
    if len(set(names)) != len(names):
        raise ScorerError(f"scorer columns repeat: {names}; rename one with COLUMN=SPEC")
    labels = [s.label for s in sets]
    if len(set(labels)) != len(labels):
        raise PromptError(f"prompt set labels repeat: {labels}")
    done = out.done()
    keys = [point_key(p, sampling, sets, scorers) for p in points]
    todo = [(p, k) for p, k in zip(points, keys) if k not in done]
    if len(todo) < len(points):
        where = f" in {out.path}" if out.path else ""
        log(f"resuming: {len(points) - len(todo)} of {len(points)} points already measured{where}")
    per_point = sum(len(s.items) for s in sets) * sampling.samples
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=per_point * len(todo), unit="ans", file=sys.stderr, dynamic_ncols=True)
    fresh: dict[str, dict[str, Any]] = {}
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            for point, key in todo:
                if bar is not None:
                    bar.set_description(point.label()[:40])
                t0 = time.time()
                m = measure(
                    client, pool, point, sets, scorers, sampling,
                    tick=bar.update if bar is not None else (lambda n: None),
                )  # fmt: skip
                record = {
                    "key": key,
                    "name": point.label(),
                    "model": point.model,
                    "eft": point.eft,
                    "results": m["results"],
                    "seconds": round(time.time() - t0, 2),
                }
                if keep_answers:
                    record["answers"] = m["answers"]
                out.add(record)
                fresh[key] = {**record, "_answers": m["answers"]}
    finally:
        if bar is not None:
            bar.close()
    return [dict(fresh.get(k) or done[k]) for k in keys]


# ---------------------------------------------------------------- tables


def knob_columns(records: Sequence[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in records:
        for k in r.get("eft") or {}:
            if k not in cols:
                cols.append(k)
    return cols


def write_csv(records: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Long format: one row per (point, prompt set, scorer)."""
    knobs = knob_columns(records)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "model", *knobs, "prompts", "scorer", "mean", "lo", "hi", "n"])
        for r in records:
            eft = r.get("eft") or {}
            for label, by_scorer in r["results"].items():
                for scorer, s in by_scorer.items():
                    w.writerow(
                        [r["name"], r["model"], *(eft.get(k, "") for k in knobs), label, scorer]
                        + ["" if s[x] is None else s[x] for x in ("mean", "lo", "hi", "n")]
                    )


def table(records: Sequence[dict[str, Any]]) -> str:
    """A plain-text table: a row per point, a column per (prompt set, scorer) mean."""
    if not records:
        return "(no points)"
    cols = [(label, sc) for label, by in records[0]["results"].items() for sc in by]
    heads = [f"{sc}@{label}" if len(records[0]["results"]) > 1 else sc for label, sc in cols]
    width = max(12, *(len(h) + 2 for h in heads))
    namew = max(20, *(len(r["name"]) + 2 for r in records))
    lines = ["".ljust(namew) + "".join(h.rjust(width) for h in heads)]
    for r in records:
        cells = []
        for label, sc in cols:
            s = r["results"].get(label, {}).get(sc)
            m = None if s is None else s["mean"]
            cells.append(("-" if m is None else f"{m:.4g}").rjust(width))
        lines.append(r["name"].ljust(namew) + "".join(cells))
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def build_points(models: Sequence[str], grid_options: Sequence[str]) -> list[Point]:
    grid = parse_grid(list(grid_options))
    efts: list[dict[str, Any] | None] = list(grid.points()) if grid_options else [None]
    return [Point(m, eft) for m in models for eft in efts]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="eft-sweep",
        description="Score answers over a grid of EFT knobs, through an eft-serve (or any "
        "OpenAI-compatible) server. Details: docs/sweeps.md.",
    )
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument(
        "--model",
        action="append",
        required=True,
        help="model id (repeatable: the grid runs on each; single models take no knobs)",
    )
    p.add_argument(
        "--prompts",
        action="append",
        required=True,
        metavar="[LABEL=]FILE",
        help="JSONL with `prompt` or `messages`, optional `expected`, `id` (repeatable)",
    )
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=SPEC",
        help="an eft key: START:STOP:STEP, V1,V2,..., or an expression of other keys "
        "(e.g. harmless=1-helpful); repeatable, the product of ranges and lists is swept",
    )
    p.add_argument(
        "--scorer",
        action="append",
        required=True,
        metavar="[COLUMN=]KIND[:ARG]",
        help="refusal[:PHRASES_FILE], contains[:TEXT], exact[:TEXT], regex[:PATTERN], "
        "implicit-reward[:EXPERT], or MODULE:FUNCTION (repeatable)",
    )
    p.add_argument("--samples", type=int, default=1, help="answers per prompt (K)")
    p.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (default 0)"
    )
    p.add_argument(
        "--top-p", type=float, default=None, help="top-p (default: not sent, i.e. the server's 1)"
    )
    p.add_argument("--seed", type=int, default=None, help="seed of the first sample chunk")
    p.add_argument(
        "--max-tokens", type=int, default=64, help="output tokens per answer (default 64)"
    )
    p.add_argument(
        "--endpoint",
        choices=("auto", "chat", "completions"),
        default="auto",
        help="auto (default): chat for prompts given as messages, completions for text",
    )
    p.add_argument(
        "--echo",
        action="store_true",
        help="score the prompts themselves (echo + max_tokens 0; with `completion`, only it)",
    )
    p.add_argument("--extra", default="{}", help="JSON object of more request body fields")
    p.add_argument(
        "--api-key",
        default=os.environ.get("EFT_API_KEY"),
        help="the server's API key (default: env EFT_API_KEY, else none)",
    )
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    p.add_argument(
        "--json",
        help="results JSON; rerunning with the same --json skips the points it holds "
        f"(default: {default_out('sweep.json')}, written afresh: only a path you give resumes)",
    )
    p.add_argument("--fresh", action="store_true", help="ignore the points already in --json")
    p.add_argument("--csv", help="results CSV (one row per point, prompt set and scorer)")
    p.add_argument("--plot", help="PNG: a line per scorer over --x, or --frontier")
    p.add_argument("--x", help="the knob on the plot's x axis (default: the first swept one)")
    p.add_argument(
        "--frontier",
        metavar="XSCORER[@LABEL],YSCORER[@LABEL]",
        help="plot two scorers against each other, a point per grid point",
    )
    p.add_argument("--save-answers", action="store_true", help="keep the answers in the JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.samples < 1 or args.concurrency < 1 or args.max_tokens < 0:
        p.error("--samples and --concurrency must be >= 1, --max-tokens >= 0")
    if args.samples > 1 and args.temperature == 0:
        p.error("--samples > 1 needs --temperature > 0 (greedy answers repeat)")
    try:
        args.extra = json.loads(args.extra)
        if not isinstance(args.extra, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        p.error(f"--extra: {exc}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot and matplotlib_missing("eft-sweep", "--plot"):
        return 2
    # Resume only from a file the user named: a default path may hold another sweep's points.
    resume = args.json is not None
    args.json = str(prepare(args.json or default_out("sweep.json")))
    for path in (args.csv, args.plot):
        if path:
            prepare(path)
    t0 = time.time()
    try:
        sets = [load_prompts(o) for o in args.prompts]
        scorers = [parse_scorer(s) for s in args.scorer]
        points = build_points(args.model, args.grid)
        sampling = Sampling(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            samples=args.samples,
            seed=args.seed,
            endpoint=args.endpoint,
            echo=args.echo,
            extra=args.extra,
        )
        header = {
            "command": shlex.join(["eft-sweep", *(sys.argv[1:] if argv is None else argv)]),
            "url": args.url,
            "sampling": sampling.as_dict(),
            "prompts": {
                s.label: {"source": s.source, "sha256": s.sha256, "count": len(s.items)}
                for s in sets
            },
            "scorers": {sc.name: sc.spec for sc in scorers},
            "grid": args.grid,
        }
        out = SweepFile(args.json, header, fresh=args.fresh or not resume)
        client = Client(args.url, args.api_key, concurrency=args.concurrency)
        try:
            records = run_sweep(
                client, points, sets, scorers, sampling, out,
                concurrency=args.concurrency, keep_answers=args.save_answers,
                progress=not args.no_progress,
            )  # fmt: skip
        finally:
            client.close()
    except (GridError, PromptError, ScorerError, SweepError) as exc:
        hint = ""
        if isinstance(exc, SweepError) and "trace" in str(exc):
            hint = (
                "\n(the implicit-reward scorer asks for the per-token trace, "
                '`"eft": {"trace": true}`; this server does not accept it)'
            )
        print(f"eft-sweep: error: {exc}{hint}", file=sys.stderr)
        return 2
    out.finish(records)
    print(table(records))
    if args.csv:
        write_csv(records, args.csv)
    if args.plot:
        from evals.plot import plot_frontier, plot_lines

        if args.frontier:
            plot_frontier(records, args.frontier, args.plot)
        else:
            plot_lines(records, args.plot, x=args.x)
    print(
        f"{len(records)} points in {time.time() - t0:.0f}s; results in {args.json}", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
