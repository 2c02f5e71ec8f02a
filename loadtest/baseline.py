"""Step cost against a fixed baseline: this checkout's engine vs the engine at an older commit.

    python -m loadtest.baseline [--ref 2504a16] [--rounds 5] [--quick] [--skip-http] [--json OUT]

Figures from different days are not comparable on a shared machine, so both engines run in the
same invocation, on the same tiny random family (built once, by this checkout), taking turns:
every round runs old then new, and the next round new then old (ABBA), so a slow drift of the
machine's load hits both sides alike. Medians over rounds are reported.

The old tree is `git archive REF` unpacked into a temporary directory (removed afterwards); each
side runs as its own process with the working directory and PYTHONPATH set to its tree, so it
imports that tree's `decoding` and `server` rather than the installed (editable) package. Each
side's import path is checked and printed.

- in_process: `python -m loadtest.engine_bench` in each tree; its "mean per step" (the
  concurrent run's engine step), "combine" and "all at once" output tokens/s. A tree whose
  engine_bench takes `--speculative` runs with it off, so both sides time plain decode steps
  (the baseline has no speculation; speculation is measured by `loadtest.spec_bench`).
- http_burst / http_mixed: `eft-serve` (`python -m server.cli`) from each tree, both running,
  loaded alternately by this checkout's load generator (so the client is the same for both):
  burst = 16 requests of 32 tokens at concurrency 16; mixed = `loadtest.prompts.mixed_workload`
  (48 requests, prompts of 4-60 words, 8-128 output tokens) at concurrency 16.

Ratios, all oriented so that > 1 means the new engine is faster:
  step_vs_baseline = the median over rounds of old / new plain decode step (16 rows, the
    median step of each run that prefills nothing, each engine timing its own steps);
  engine_step_vs_baseline = old / new engine_bench mean step (its prefill step included;
    also combine_vs_baseline);
  throughput_vs_baseline = new output tokens/s / old output tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_REF = "2504a16"
SIDES = ("old", "new")


class BaselineError(Exception):
    """A setup problem worth one clear line (not a git checkout, unknown ref, a side failed)."""


# --- the two trees ---------------------------------------------------------------------------


def repo_root(start: Path | None = None) -> Path:
    """The git checkout this module lives in: the "new" side."""
    here = start or Path(__file__).resolve().parent
    proc = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise BaselineError(
            f"{here} is not inside a git checkout, so there is no older commit to compare "
            f"against: {proc.stderr.strip()}"
        )
    return Path(proc.stdout.strip())


def resolve_ref(root: Path, ref: str) -> str:
    proc = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise BaselineError(f"ref {ref!r} is not a commit of the repository at {root}")
    return proc.stdout.strip()


def export_tree(root: Path, commit: str, dest: Path) -> Path:
    """The tracked files at `commit`, unpacked into `dest`.

    `git archive` rather than `git worktree add`: it registers nothing in the repository, so a
    run killed half-way leaves no stale worktree behind, only a temporary directory.
    """
    dest.mkdir(parents=True)
    archive = subprocess.Popen(["git", "archive", commit], cwd=root, stdout=subprocess.PIPE)
    tar = subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout)
    archive.stdout.close()  # type: ignore[union-attr]
    if archive.wait() != 0 or tar.returncode != 0:
        raise BaselineError(f"could not unpack {commit} into {dest}")
    if not (dest / "loadtest" / "engine_bench.py").exists():
        raise BaselineError(f"{commit} has no loadtest/engine_bench.py; pick a later --ref")
    return dest


def tree_env(tree: Path) -> dict[str, str]:
    # PYTHONPATH comes before site-packages, where the editable install points at some other
    # checkout; the working directory (sys.path[0] under -m) is the tree too.
    return {**os.environ, "PYTHONPATH": str(tree), "TOKENIZERS_PARALLELISM": "false"}


def imported_from(tree: Path) -> str:
    """Where a process started like the benchmarks' imports `decoding` from; must be `tree`."""
    code = "import decoding, server; print(decoding.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, env=tree_env(tree), capture_output=True, text=True
    )
    path = out.stdout.strip()
    if out.returncode != 0 or not Path(path).resolve().is_relative_to(tree.resolve()):
        raise BaselineError(f"a process in {tree} imports decoding from {path!r}: {out.stderr}")
    return path


# --- in process: engine_bench ----------------------------------------------------------------

_FLOAT = r"([0-9]+(?:\.[0-9]+)?)"
ENGINE_BENCH_LINES = {
    "step_ms": re.compile(rf"^\s*mean per step\s+{_FLOAT} ms", re.M),
    "combine_ms": re.compile(rf"^\s*combine\s+{_FLOAT} ms", re.M),
    "tokens_per_s": re.compile(rf"^\s*all at once:\s+{_FLOAT} output tokens/s", re.M),
    "sequential_tokens_per_s": re.compile(
        rf"^\s*one after another:\s+{_FLOAT} output tokens/s", re.M
    ),
}


def parse_engine_bench(text: str) -> dict[str, float]:
    """The figures of one `loadtest.engine_bench` run, from its printed report."""
    out = {}
    for key, pattern in ENGINE_BENCH_LINES.items():
        m = pattern.search(text)
        if m is None:
            raise BaselineError(f"engine_bench printed no {key!r} line:\n{text[-2000:]}")
        out[key] = float(m.group(1))
    return out


def engine_bench(tree: Path, family: Path, requests: int, max_tokens: int, threads: int) -> dict:
    cmd = [
        sys.executable, "-m", "loadtest.engine_bench", "--config", str(family),
        "--requests", str(requests), "--max-tokens", str(max_tokens), "--threads", str(threads),
    ]  # fmt: skip
    if "--speculative" in (tree / "loadtest" / "engine_bench.py").read_text():
        # The baseline has no speculative decoding: both sides time plain decode steps.
        cmd += ["--speculative", "off"]
    proc = subprocess.run(
        cmd, cwd=tree, env=tree_env(tree), capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        raise BaselineError(f"engine_bench in {tree} failed:\n{proc.stderr[-3000:]}")
    return parse_engine_bench(proc.stdout)


# A plain decode step, timed by each engine itself: 16 requests of 32 tokens join at once (all
# four models, temperature 0.8, seeded), and the median step that prefills nothing is kept. It
# uses only what both trees have (Engine, EngineConfig, StepStats.step_seconds); speculation, which
# the baseline lacks, is off where the engine has it.
DECODE_SCRIPT = """
import asyncio, json, statistics, sys
import torch
torch.set_num_threads(int(sys.argv[2]))
from decoding.composition import make_composition
from decoding.engine import Engine, EngineConfig
from decoding.family import load_family
from decoding.request import GenerationRequest, SamplingParams
family = load_family(sys.argv[1])
config = EngineConfig(max_batch_size=32)
if hasattr(config, "speculative"):
    config.speculative = "off"
steps = []
engine = Engine(family, config, on_step=steps.append)
comp = make_composition(family, None, {e: 0.5 for e in family.config.experts})
def request(i, tag):
    ids = family.tokenizer.encode(f"request {i}: the river city of salt and copper")
    params = SamplingParams(max_tokens=32, temperature=0.8, seed=i, ignore_eos=True)
    return GenerationRequest(f"{tag}{i}", {m: ids for m in family.models}, comp, params)
async def drain(req):
    async for _ in engine.submit(req):
        pass
async def main():
    engine.start()
    await asyncio.gather(*[drain(request(i, "warm")) for i in range(16)])
    medians = []
    for rep in range(3):
        steps.clear()
        await asyncio.gather(*[drain(request(i, f"r{rep}")) for i in range(16)])
        decode = [s.step_seconds for s in steps if s.batch_size == 16 and not s.prompt_tokens]
        medians.append(1e3 * statistics.median(decode))
    await engine.shutdown()
    print(json.dumps({"decode_step_ms": statistics.median(medians)}))
asyncio.run(main())
"""


def decode_step(tree: Path, family: Path, threads: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", DECODE_SCRIPT, str(family), str(threads)],
        cwd=tree, env=tree_env(tree), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if proc.returncode != 0:
        raise BaselineError(f"the decode-step timing in {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the comparison --------------------------------------------------------------------------


def round_order(i: int) -> tuple[str, str]:
    """old, new; then new, old (ABBA): a linear drift of the machine cancels over two rounds."""
    return SIDES if i % 2 == 0 else SIDES[::-1]


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def compare(runs: dict[str, list[dict[str, float]]]) -> dict:
    """Per-side medians and the ratios, each > 1 when the new side is faster."""
    out: dict = {side: {**medians(runs[side]), "rounds": runs[side]} for side in SIDES}
    old, new = out["old"], out["new"]
    if "decode_step_ms" in old:
        # The median, over rounds, of each round's old/new ratio: the sides of one round ran
        # back to back, so a burst of load elsewhere on the machine hits both alike.
        pairs = [
            o["decode_step_ms"] / n["decode_step_ms"] for o, n in zip(runs["old"], runs["new"])
        ]
        out["step_vs_baseline"] = statistics.median(pairs)
        out["decode_step_ratios"] = pairs
    if "step_ms" in old:
        out["engine_step_vs_baseline"] = old["step_ms"] / new["step_ms"]
    if "combine_ms" in old and new["combine_ms"] > 0:
        out["combine_vs_baseline"] = old["combine_ms"] / new["combine_ms"]
    if "ttft_p50_ms" in old:
        out["ttft_vs_baseline"] = old["ttft_p50_ms"] / new["ttft_p50_ms"]
    out["throughput_vs_baseline"] = new["tokens_per_s"] / old["tokens_per_s"]
    return out


def in_process(trees: dict[str, Path], family: Path, args: argparse.Namespace) -> dict:
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in SIDES}
    for i in range(args.rounds):
        for side in round_order(i):
            res = engine_bench(trees[side], family, args.requests, args.max_tokens, args.threads)
            res.update(decode_step(trees[side], family, args.threads))
            log(f"in_process round {i + 1} {side}: {res['step_ms']:.2f} ms/step, "
                f"{res['tokens_per_s']:.0f} tok/s, "
                f"decode step {res['decode_step_ms']:.2f} ms")  # fmt: skip
            runs[side].append(res)
    out = compare(runs)
    out["config"] = {"requests": args.requests, "max_tokens": args.max_tokens,
                     "threads": args.threads}  # fmt: skip
    return out


# --- over HTTP -------------------------------------------------------------------------------


def start_server(tree: Path, family: Path, threads: int, log_path: Path, extra: list[str]):
    from loadtest.server_proc import BenchServer

    # `env -C`: the server's own directory and import path are its tree's (see tree_env).
    program = ["env", "-C", str(tree), f"PYTHONPATH={tree}", sys.executable, "-m", "server.cli"]
    server = BenchServer(
        family,
        log_path,
        max_batch_size=32,
        extra_args=["--threads", str(threads), *extra],
        ready_timeout=180,
        program=program,
    )
    return server.start()


def http_workloads(quick: bool) -> dict[str, dict]:
    from loadtest.prompts import mixed_workload

    mixed = 16 if quick else 48
    return {
        "http_burst": {"concurrency": 16, "requests": 16, "max_tokens": 32, "prompt_len": 32},
        "http_mixed": {"concurrency": 16, "workload": mixed_workload(mixed, seed=0)},
    }


def http_load(url: str, shape: dict) -> dict[str, float]:
    from loadtest.runner import LoadConfig, run_load

    cfg = LoadConfig(url=url, timeout=300, duration=600, seed=0, progress=False, **shape)
    s = asyncio.run(run_load(cfg)).summary()
    if s["errors"] or not s["completed"]:
        raise BaselineError(f"{url}: {s['errors']} errors: {s['error_examples']}")
    return {
        "tokens_per_s": s["output_token_throughput"],
        "itl_p50_ms": s["itl_ms"]["p50"],
        "ttft_p50_ms": s["ttft_ms"]["p50"],
    }


def over_http(trees: dict[str, Path], family: Path, tmp: Path, args: argparse.Namespace) -> dict:
    servers = {}
    try:
        # Both servers up at once, loaded in turn: an idle server only waits on its queue.
        for side in SIDES:
            extra = shlex.split(getattr(args, f"{side}_server_args"))
            servers[side] = start_server(
                trees[side], family, args.threads, tmp / f"{side}.log", extra
            )
            log(f"{side} server: {shlex.join(servers[side].cmd)}")
        out = {}
        for name, shape in http_workloads(args.quick).items():
            runs: dict[str, list[dict[str, float]]] = {s: [] for s in SIDES}
            for i in range(args.rounds):
                for side in round_order(i):
                    res = http_load(servers[side].url, shape)
                    log(f"{name} round {i + 1} {side}: {res['tokens_per_s']:.0f} tok/s")
                    runs[side].append(res)
            out[name] = compare(runs)
            described = {k: v for k, v in shape.items() if k != "workload"}
            if "workload" in shape:
                described["requests"] = len(shape["workload"])
            out[name]["config"] = described
        return out
    finally:
        for server in servers.values():
            server.stop()


# --- report ----------------------------------------------------------------------------------


def format_table(res: dict) -> str:
    rows = [f"{'':<28} {'old':>10} {'new':>10} {'new faster by':>14}"]

    def row(label: str, part: dict, key: str, ratio: str) -> None:
        rows.append(f"{label:<28} {part['old'][key]:>10.2f} {part['new'][key]:>10.2f} "
                    f"{part[ratio]:>13.3f}x")  # fmt: skip

    if "in_process" in res:
        ip = res["in_process"]
        if "decode_step_ms" in ip["old"]:
            row("decode step ms (16 rows)", ip, "decode_step_ms", "step_vs_baseline")
        row("engine_bench step ms (c=16)", ip, "step_ms", "engine_step_vs_baseline")
        if "combine_vs_baseline" in ip:
            row("  combine ms", ip, "combine_ms", "combine_vs_baseline")
        row("engine tokens/s (c=16)", ip, "tokens_per_s", "throughput_vs_baseline")
    for name in ("http_burst", "http_mixed"):
        if name in res:
            row(f"{name[5:]} HTTP tokens/s", res[name], "tokens_per_s", "throughput_vs_baseline")
            row(f"{name[5:]} HTTP TTFT p50 ms", res[name], "ttft_p50_ms", "ttft_vs_baseline")
    return "\n".join(rows)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.baseline",
                                description=__doc__.split("\n\n")[0])  # fmt: skip
    p.add_argument(
        "--ref", default=DEFAULT_REF, help=f"the baseline commit (default {DEFAULT_REF})"
    )
    p.add_argument("--rounds", type=int, default=None,
                   help="turns per side and measurement (default 5; 2 with --quick)")  # fmt: skip
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: 2 rounds, 16 output tokens, a 16-request mixed workload",
    )
    p.add_argument("--skip-http", action="store_true", help="only the in-process comparison")
    p.add_argument("--requests", type=int, default=16, help="engine_bench --requests (16)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="engine_bench --max-tokens (default 32; 16 with --quick)")  # fmt: skip
    # One torch thread per process: the tiny family is faster so, and the two sides never
    # compete for cores that another process on a shared machine also wants.
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (1)")
    # Each tree's server runs with its own defaults (what a user of that commit gets); flags
    # only one side has, e.g. the new server's --speculative, go to that side alone.
    p.add_argument("--old-server-args", default="", help="extra eft-serve flags, old side")
    p.add_argument("--new-server-args", default="",
                   help="extra eft-serve flags, new side, e.g. '--speculative off'")  # fmt: skip
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write the results as JSON")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 5
    if args.max_tokens is None:
        args.max_tokens = 16 if args.quick else 32
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "loadtest.baseline", *argv])
    print(f"command: {command}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="eft-baseline-"))
    try:
        new_root = repo_root()
        commit = resolve_ref(new_root, args.ref)
        trees = {"old": export_tree(new_root, commit, tmp / "old"), "new": new_root}
        imports = {side: imported_from(tree) for side, tree in trees.items()}
        for side in SIDES:
            print(f"{side}: decoding from {imports[side]}")
        family = build_family(new_root, tmp / "family")
        res: dict = {"command": command, "ref": args.ref, "ref_commit": commit,
                     "new_tree": str(new_root), "imports": imports,
                     "rounds": args.rounds, "order": "ABBA (old, new; new, old; ...)",
                     "server_args": {"old": args.old_server_args,
                                     "new": args.new_server_args}}  # fmt: skip
        res["in_process"] = in_process(trees, family, args)
        if not args.skip_http:
            res.update(over_http(trees, family, tmp, args))
    except (BaselineError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"baseline {args.ref} ({commit[:12]}) vs {res['new_tree']}; medians of "
          f"{args.rounds} rounds; ratios > 1: the new engine is faster")  # fmt: skip
    print(format_table(res))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def build_family(tree: Path, dest: Path) -> Path:
    """engine_bench's tiny random family, built once by the new tree and used by both sides."""
    code = (
        "import sys, transformers; transformers.utils.logging.disable_progress_bar(); "
        "from demo.random_family import build_random_family; "
        "print(build_random_family(sys.argv[1]))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(dest)], cwd=tree, env=tree_env(tree),
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise BaselineError(f"building the random family failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
