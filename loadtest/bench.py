"""`python -m loadtest.bench [--quick] --json OUT [--plot OUT.png]`: side-by-side benchmarks.

One run measures, on the same models and machine:
- batched_vs_sequential: eft-serve's output tokens/s at concurrency 16 / a naive baseline
  (HF `generate` one request at a time, the other models run by a LogitsProcessor);
- eft_vs_base: EFT composition / `<family>/large-base` alone, both through the server at c=16;
- eft_vs_ideal: eft_vs_base / (cost(L) / (cost(L) + sum cost(small models run)));
- scaling: tokens/s and ITL p50/p99 at concurrency 1, 2, 4, 8, 16, 32;
- batching_limit: 16 x the engine's decode-step time at batch 1 / at batch 16 (an in-process
  `Engine` on the same models), and batching_efficiency = batched_vs_sequential / that limit;
- vs_static_batch: a mixed workload (48 requests, prompts of 4-60 words, 8-128 output tokens)
  through the server at concurrency 16 / the naive EFT loop in static batches of 16;
- itl_p99_over_p50_poisson: ITL p99 / p50 of the mixed workload under Poisson arrivals, at most
  16 in flight;
- adapter_step_ratio_b1/_b16: the engine's decode-step time with two LoRA experts served as
  separate merged models / as adapters of the reference (one forward for the reference and its
  adapters), at batch 1 and 16, and adapter_forward_ratio_b1/_b16 the same for the forward
  time of the reference and experts alone (`loadtest.adapter_bench`);
- spec_speedup_b1, spec_acceptance, spec_speedup_c16: speculative EFT vs off, on the demo
  family (trained experts; `loadtest.spec_bench`);
- structured_overhead: the engine's output tokens/s with a JSON Schema / without, the same 16
  prompts at once (`loadtest.structured_bench`);
- memory: peak server RSS per phase, per-model KV bytes at the peak, KV bytes once idle, and
  rss_growth = RSS after 1,000 requests / after 100.
The bench builds its family, starts `eft-serve` itself on a free loopback port and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from loadtest.adapter_bench import compare as compare_adapters
from loadtest.bench_results import compose, format_markdown, format_table
from loadtest.engine_bench import decode_step_seconds
from loadtest.naive import forward_costs, prompt_ids, run_naive, run_static_batches
from loadtest.prom import histogram_mean_delta
from loadtest.prompts import mixed_workload
from loadtest.runner import LoadConfig, LoadRun, run_load
from loadtest.server_proc import BenchServer, MemoryMonitor
from loadtest.spec_bench import DEMO, compare_all, eval_prompts
from loadtest.structured_bench import measure as measure_structured

# Up-scaling, the paper's headline: one expert at weight 1 (harmless explicitly off).
EFT_KNOBS = {"helpful": 1.0, "harmless": 0.0}
LEVELS = (1, 2, 4, 8, 16, 32)
MIXED_SEED = 0  # the mixed workload vs static batches; MIXED_SEED + 1: the Poisson run's


@dataclass(frozen=True)
class Plan:
    name: str
    family_name: str
    large: dict  # llama_config keywords of demo.random_family
    small: dict
    init_std: float
    prompt_len: int
    max_tokens: int
    range_ratio: float  # output lengths in [K(1-r), K(1+r)]: requests join running batches
    naive_requests: int
    repeats: int  # naive runs, and extra (large-base, EFT) pairs at c=16; the best one counts
    min_requests: int  # per concurrency level: max(2 * c, min_requests)
    level_duration: float  # seconds; a level stops issuing requests after this
    rss_prompt_len: int  # the leak check's 1,000 requests are short: memory, not compute
    rss_max_tokens: int
    rss_duration: float
    request_timeout: float  # seconds; a request still running then counts as an error
    mixed_requests: int  # the mixed workload (vs static batches, and under Poisson arrivals)
    mixed_duration: float  # seconds; its runs stop issuing requests after this


QUICK = Plan(
    "quick",
    family_name="tiny",
    large={"hidden": 64, "layers": 3, "heads": 4, "kv_heads": 2},
    small={"hidden": 32, "layers": 2, "heads": 2},
    init_std=0.2,
    prompt_len=16,
    max_tokens=16,
    range_ratio=0.5,
    naive_requests=4,
    repeats=3,
    min_requests=4,
    level_duration=20,
    rss_prompt_len=4,
    rss_max_tokens=2,
    rss_duration=60,
    request_timeout=120,
    mixed_requests=48,
    mixed_duration=120,
)
# Shaped like a real pair: large ~309M parameters, small ~29M (~1/10), so compute dominates.
# init_std 0.02 (the usual) rather than the tiny family's 0.2: 24 random layers at 0.2 can
# overflow, and throughput figures do not need peaked distributions.
FULL = Plan(
    "full",
    family_name="perf",
    large={"hidden": 1024, "layers": 24, "heads": 16, "intermediate": 2816},
    small={"hidden": 512, "layers": 9, "heads": 8, "intermediate": 1408},
    init_std=0.02,
    prompt_len=16,
    max_tokens=16,
    range_ratio=0.5,
    naive_requests=2,
    repeats=2,
    min_requests=4,
    level_duration=45,
    rss_prompt_len=2,
    rss_max_tokens=2,
    rss_duration=240,
    # a 24-token request at c=32 on a busy 2-core CPU can take minutes: slow is not an error
    request_timeout=900,
    mixed_requests=48,
    mixed_duration=900,
)


def build_family(plan: Plan, family_dir: Path) -> Path:
    """Build the plan's random family once; a later run with the same shapes reuses it."""
    from demo.random_family import build_random_family

    yaml_path = family_dir / "family.yaml"
    stamp = family_dir / "shape.json"
    shape = json.dumps(
        {
            "name": plan.family_name,
            "large": plan.large,
            "small": plan.small,
            "init_std": plan.init_std,
        },
        sort_keys=True,
    )
    if yaml_path.exists() and stamp.exists() and stamp.read_text() == shape:
        return yaml_path
    log(f"building the {plan.name} family in {family_dir} ...")
    path = build_random_family(
        family_dir,
        name=plan.family_name,
        large=plan.large,
        small=plan.small,
        init_std=plan.init_std,
    )
    stamp.write_text(shape)
    return path


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load(
    server: BenchServer,
    plan: Plan,
    concurrency: int,
    requests: int,
    *,
    model: str | None = None,
    knobs: str = "fixed",
    max_tokens: int | None = None,
    prompt_len: int | None = None,
    duration: float | None = None,
    range_ratio: float | None = None,
    seed: int = 0,
    workload: list[tuple[str, int]] | None = None,
    rate: float | None = None,
) -> LoadRun:
    cfg = LoadConfig(
        url=server.url,
        concurrency=concurrency,
        rate=rate,
        workload=workload,
        requests=requests,
        duration=duration or plan.level_duration,
        timeout=plan.request_timeout,
        max_tokens=max_tokens or plan.max_tokens,
        prompt_len=prompt_len or plan.prompt_len,
        range_ratio=plan.range_ratio if range_ratio is None else range_ratio,
        knobs=knobs,
        fixed_knobs=None if model else EFT_KNOBS,
        logprobs=True,  # one chunk per token, so ITL is per decoding step (as vLLM streams)
        model=model,
        seed=seed,
        progress=False,
    )
    run = asyncio.run(run_load(cfg))
    s = run.summary()
    label = model or f"EFT {knobs}" + (" mixed load" if workload else "")
    if rate:
        label += f" Poisson {rate:.2f}/s"
    log(
        f"  c={concurrency:<3} {label:<22} {s['completed']:>4} ok {s['errors']:>3} err "
        f"{s['output_token_throughput']:8.1f} tok/s  ITL p50 {s['itl_ms']['p50']:7.1f} ms "
        f"p99 {s['itl_ms']['p99']:7.1f} ms"
    )
    if s["errors"]:
        log(f"  errors: {s['errors_by_status']} {s['error_examples'][:2]}")
    return run


def run_server_benches(
    plan: Plan,
    family_yaml: Path,
    family_name: str,
    workdir: Path,
    levels: tuple[int, ...],
    max_batch_size: int,
    program: list[str],
) -> dict:
    out: dict = {"runs": {}}
    server = BenchServer(
        family_yaml, workdir / "server.log", max_batch_size=max_batch_size, program=program
    )
    log(f"starting {shlex.join(server.cmd)}")
    with server, MemoryMonitor(server) as mon:
        out["rss_idle_bytes"] = server.rss()
        out["kv_bytes_start"] = mon.kv_bytes()
        load(server, plan, 4, 4, max_tokens=4)  # warm-up: first-call allocations, lazy inits
        for c in levels:
            before = server.metrics()
            with mon.phase(f"eft_c{c}"):
                out["runs"][f"eft_c{c}"] = load(server, plan, c, max(2 * c, plan.min_requests))
            if c == 16:
                out["forward_from_metrics"] = histogram_mean_delta(
                    before, server.metrics(), "eft_model_forward_seconds", "model"
                )
        # EFT vs the large base alone, in adjacent pairs: on a shared machine the load from
        # other processes drifts, and the best of each kind is the least disturbed.
        for r in range(plan.repeats):
            suffix = f"_r{r}" if r else ""
            with mon.phase(f"base_c16{suffix}"):
                out["runs"][f"base_c16{suffix}"] = load(
                    server, plan, 16, 32, model=f"{family_name}/large-base", seed=10 * r
                )
            if r:
                with mon.phase(f"eft_c16{suffix}"):
                    out["runs"][f"eft_c16{suffix}"] = load(server, plan, 16, 32, seed=10 * r)
        with mon.phase("eft_mixed_c16"):
            out["runs"]["eft_mixed_c16"] = load(
                server, plan, 16, max(32, plan.min_requests), knobs="mixed"
            )
        # The mixed workload (the same requests the naive static batches ran), closed loop at
        # 16; then another draw of it under Poisson arrivals at the rate the closed loop
        # sustained, at most 16 in flight.
        workload = mixed_workload(plan.mixed_requests, MIXED_SEED)
        mixed = {"duration": plan.mixed_duration, "workload": workload}
        with mon.phase("eft_workload_c16"):
            out["runs"]["eft_workload_c16"] = run = load(server, plan, 16, len(workload), **mixed)
        rate = run.summary()["request_throughput"]
        mixed["workload"] = mixed_workload(plan.mixed_requests, MIXED_SEED + 1)
        with mon.phase("eft_poisson_c16"):
            out["runs"]["eft_poisson_c16"] = load(
                server, plan, 16, len(workload), rate=rate, seed=1, **mixed
            )
        time.sleep(1.0)  # let the engine free the last rows
        out["kv_bytes_idle"] = mon.kv_bytes()
        # Leak check: RSS after 1,000 short requests vs after the first 100.
        with mon.phase("rss"):
            short = {
                "max_tokens": plan.rss_max_tokens,
                "prompt_len": plan.rss_prompt_len,
                "duration": plan.rss_duration,
                "range_ratio": 0.0,
            }
            first = load(server, plan, 16, 100, seed=1, **short)
            time.sleep(0.5)
            out["rss_after_100"] = server.rss()
            rest = load(server, plan, 16, 900, seed=2, **short)
            time.sleep(0.5)
            out["rss_after_1000"] = server.rss()
            out["rss_requests"] = sum(r.summary()["completed"] for r in (first, rest))
        time.sleep(1.0)
        out["kv_bytes_idle_after_rss"] = mon.kv_bytes()
        out["peak_rss_bytes"] = mon.peak_rss
        out["kv_bytes_at_peak"] = mon.peak_kv
        out["loadavg"] = mon.loadavg
    return out


def speculative_on_demo(plan: Plan) -> dict:
    """Speculative EFT against `off` on the demo family, whose trained experts agree with the
    up-scaled model as real ones do (a random family's acceptance means nothing): its eval
    set's chat questions, batch 1 greedy and at temperature 1, and 16 concurrent with `auto`."""
    import torch

    from decoding.family import load_family

    log("speculative EFT vs off, demo family: batch 1 (greedy, temperature 1), 16 concurrent")
    demo = load_family(str(DEMO), device="cpu", dtype="float32")
    prompts = eval_prompts(DEMO, 16 if plan.name == "quick" else 24)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `loadtest.spec_bench`: tiny models run fastest on one thread
    try:
        spec = compare_all(demo, prompts, "4", 48, reps=1 if plan.name == "quick" else 2)
    finally:
        torch.set_num_threads(threads)
    log("  " + ", ".join(f"{k} {v['ratio']:.2f}x" for k, v in spec.items()))
    return spec


def in_process(plan: Plan, family_yaml: Path) -> dict:
    """What runs the models in this process, with the family loaded once: the naive baselines
    (one request at a time, and static batches of the mixed workload), each model's decode step
    timed directly, and the engine's own decode-step time at batch 1 and 16."""
    from decoding.family import load_family

    family = load_family(str(family_yaml), device="cpu", dtype="float32")
    try:
        log(
            f"naive baseline: {plan.naive_requests} requests x {plan.max_tokens} tokens, "
            "one at a time"
        )
        naive = [
            run_naive(family, EFT_KNOBS, plan.naive_requests, plan.prompt_len, plan.max_tokens, r)
            for r in range(plan.repeats)
        ]
        context = plan.prompt_len + plan.max_tokens // 2
        costs = forward_costs(family, 16, context)
        log(
            "  naive "
            + ", ".join(f"{n.output_token_throughput:.1f}" for n in naive)
            + " tok/s; forward ms at batch 16: "
            + ", ".join(f"{m} {1000 * v:.2f}" for m, v in costs.items())
        )
        prompts = prompt_ids(family, 16, plan.prompt_len, seed=7)
        engine_steps = decode_step_seconds(family, EFT_KNOBS, prompts, plan.max_tokens)
        log(
            "  engine decode step: "
            + ", ".join(f"batch {b} {1000 * v:.2f} ms" for b, v in engine_steps.items())
        )
        log("structured outputs: a JSON Schema vs none, 16 prompts at once")
        structured = measure_structured(family, max_tokens=plan.max_tokens)
        log(f"  structured_overhead {structured['structured_overhead']:.3f}")
        spec = speculative_on_demo(plan)
        log("LoRA experts as adapters of the reference vs as separate merged models")
        adapters = compare_adapters(family_yaml, max_tokens=plan.max_tokens, rounds=2)
        log(f"  step ratio batch 1 {adapters['ratio_b1']:.2f}x, 16 {adapters['ratio_b16']:.2f}x")
        workload = mixed_workload(plan.mixed_requests, MIXED_SEED)
        log(f"naive static batches of 16: {len(workload)} requests of the mixed workload")
        static = run_static_batches(family, EFT_KNOBS, workload, batch=16, seed=MIXED_SEED)
        log(f"  {static.output_token_throughput:.1f} requested tok/s in {static.seconds:.1f} s")
        return {
            "naive_runs": naive,
            "costs": costs,
            "costs_b1": forward_costs(family, 1, context),
            "params": {name: m.num_params for name, m in family.models.items()},
            "engine_step_seconds": engine_steps,
            "static": static,
            "workload_lengths": [k for _, k in workload],
            "spec": spec,
            "adapters": adapters,
            "structured": structured,
        }
    finally:
        del family
        gc.collect()


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    label = (
        f"{os.cpu_count()}-core CPU ({cpu}), torch {torch.__version__}, float32, "
        f"{torch.get_num_threads()} torch threads"
    )
    return {
        "label": label,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
        "memory_bytes": psutil.virtual_memory().total,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny random family, a few minutes at most (what a developer runs)",
    )
    p.add_argument(
        "--json",
        dest="json_out",
        required=True,
        metavar="OUT",
        help="write every figure here (required)",
    )
    p.add_argument(
        "--plot",
        metavar="OUT.png",
        help="latency CDFs and throughput of the server runs (default: none)",
    )
    p.add_argument("--markdown", metavar="OUT.md", help="the headline figures as Markdown tables")
    p.add_argument(
        "--family-dir",
        default=None,
        help="where to build (and reuse) the random family; default: a temp dir "
        "for --quick, ~/.cache/eft-serve/perf-family for the full run",
    )
    p.add_argument(
        "--levels",
        default=",".join(map(str, LEVELS)),
        help="concurrency levels for `scaling` (must include 1, 4 and 16)",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=32,
        help="--max-batch-size of the started eft-serve (default 32)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for both the server (--threads) and the naive baseline "
        "(default: torch's own, one per core)",
    )
    p.add_argument(
        "--server-cmd",
        default="eft-serve",
        help="the server program (default eft-serve); the bench appends --config, --host, "
        "--port and --max-batch-size",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    plan = QUICK if args.quick else FULL
    levels = tuple(int(x) for x in args.levels.split(","))
    if not {1, 4, 16} <= set(levels):
        raise SystemExit("--levels must include 1, 4 and 16")
    command = shlex.join(["python", "-m", "loadtest.bench", *(argv or sys.argv[1:])])
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # the naive baseline runs in this process
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="eft-bench-") as tmp:
        workdir = Path(tmp)
        if args.family_dir:
            family_dir = Path(args.family_dir)
        elif plan.name == "quick":
            family_dir = workdir / "family"
        else:
            family_dir = Path.home() / ".cache" / "eft-serve" / "perf-family"
        family_yaml = build_family(plan, family_dir)
        from decoding.family import FamilyConfig

        family_name = FamilyConfig.from_yaml(family_yaml).name

        local = in_process(plan, family_yaml)
        paged = paged_kv_and_scheduling(plan, family_yaml, workdir, args.threads)
        srv = run_server_benches(
            plan,
            family_yaml,
            family_name,
            workdir,
            levels,
            args.max_batch_size,
            shlex.split(args.server_cmd)
            + (["--threads", str(args.threads)] if args.threads else []),
        )
    res: dict = {"plan": plan.name, "command": command, "machine": machine}
    res["family"] = family_info(family_yaml, plan, local.pop("params"))
    spec = local.pop("spec")
    adapters = local.pop("adapters")
    structured = local.pop("structured")
    res.update(compose(srv=srv, levels=levels, **local))
    res["spec_speedup_b1"] = spec["b1_greedy"]["ratio"]
    res["spec_speedup_b1_temperature_1"] = spec["b1_temperature_1"]["ratio"]
    res["spec_acceptance"] = spec["b1_temperature_1"]["acceptance"]
    res["spec_speedup_c16"] = spec["c16_auto_vs_off"]["ratio"]
    res["spec"] = spec
    res["adapters"] = adapters
    res["structured_overhead"] = structured["structured_overhead"]
    res["structured"] = structured
    res["adapter_step_ratio_b1"] = adapters["ratio_b1"]
    res["adapter_step_ratio_b16"] = adapters["ratio_b16"]
    res["adapter_forward_ratio_b1"] = adapters["forward_ratio_b1"]
    res["adapter_forward_ratio_b16"] = adapters["forward_ratio_b16"]
    res.update(paged)
    res["kv_bytes_over_needed"] = paged["kv"]["long-short"]["kv_bytes_over_needed"]
    res["prefix_cache_speedup"] = paged["kv"]["prefix"]["prefix_cache_speedup"]
    res["preemption"] = paged["kv"]["preemption"]
    res["step_vs_baseline"] = paged["baseline"]["in_process"]["step_vs_baseline"]
    res["goodput"] = paged["goodput"]["goodput"]
    res["goodput_slo"] = paged["goodput"]["slo"]
    res["machine"]["loadavg_end"] = os.getloadavg()
    res["bench_seconds"] = time.perf_counter() - t_start
    print(format_table(res))
    Path(args.json_out).write_text(json.dumps(res, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(format_markdown(res) + "\n")
    if args.plot:
        from loadtest.report import plot_runs

        plot_runs({k: v for k, v in srv["runs"].items() if "_r" not in k}, args.plot)
    return 0


def paged_kv_and_scheduling(plan: Plan, family_yaml: Path, workdir: Path, threads: int) -> dict:
    """The engine-v3 figures: the paged KV workloads (`loadtest.kv_bench`, on its own 4/2-layer
    family), the step against the pinned baseline commit (`loadtest.baseline`, tiny family,
    in process and over HTTP), and goodput on the bench family (`loadtest.goodput`)."""
    quick = ["--quick"] if plan.name == "quick" else []
    out: dict = {}
    for name, module, extra in (
        ("kv", "loadtest.kv_bench", []),
        ("baseline", "loadtest.baseline", []),
    ):
        path = workdir / f"{name}.json"
        cmd = [sys.executable, "-m", module, *quick, *extra, "--json", str(path)]
        log(f"running {shlex.join(cmd[1:])}")
        subprocess.run(cmd, check=True, timeout=3600)
        out[name] = json.loads(path.read_text())
    server = BenchServer(family_yaml, workdir / "goodput-server.log",
                         extra_args=["--threads", str(threads or 1)])  # fmt: skip
    with server:
        path = workdir / "goodput.json"
        rates = "2,4,8" if quick else "1,2,4,8"
        cmd = [sys.executable, "-m", "loadtest.goodput", "--url", server.url, "--rates", rates,
               "--requests", "24" if quick else "48", "--ttft-slo-ms", str(GOODPUT_SLO[0]),
               "--itl-slo-ms", str(GOODPUT_SLO[1]), "--json", str(path)]  # fmt: skip
        log(f"running {shlex.join(cmd[1:])}")
        subprocess.run(cmd, check=True, timeout=1800)
        out["goodput"] = json.loads(path.read_text())
    return out


# Goodput objectives (TTFT ms, mean ITL ms): a first token within a second and a stream no
# slower than 10 tokens/s, on this CPU.
GOODPUT_SLO = (1000, 100)


def family_info(family_yaml: Path, plan: Plan, params: dict[str, int]) -> dict:
    large, small = params["large-base"], params["small-base"]
    return {
        "name": plan.family_name,
        "path": str(family_yaml),
        "params": params,
        "large": plan.large,
        "small": plan.small,
        "summary": f"{plan.family_name}: large-base {large / 1e6:.1f}M params, small models "
        f"{small / 1e6:.1f}M each ({small / large:.2f} of large), prompt {plan.prompt_len} "
        f"tokens, {plan.max_tokens} ± {plan.range_ratio:.0%} output tokens per request",
    }


if __name__ == "__main__":
    sys.exit(main())
