"""The bench's results: ratios and targets from the raw measurements, and the printed table."""

from __future__ import annotations

import heapq

from loadtest.naive import NaiveResult
from loadtest.runner import LoadRun

TARGETS = {
    # issue 6
    "batched_vs_sequential": (">=", 6.0),
    "eft_vs_ideal": (">=", 0.8),
    "itl_p99_over_p50_c16": ("<=", 3.0),
    "rss_growth": ("<=", 1.05),
    # issue 9
    "batching_efficiency": (">=", 0.8),
    "vs_static_batch": (">=", 2.2),
    "itl_p99_over_p50_poisson": ("<=", 2.0),
}


def level_row(run: LoadRun) -> dict:
    s = run.summary()
    return {
        "output_token_throughput": s["output_token_throughput"],
        "request_throughput": s["request_throughput"],
        "itl_p50_ms": s["itl_ms"]["p50"],
        "itl_p99_ms": s["itl_ms"]["p99"],
        "ttft_p50_ms": s["ttft_ms"]["p50"],
        "ttft_p99_ms": s["ttft_ms"]["p99"],
        "e2e_p50_ms": s["e2e_ms"]["p50"],
        "completed": s["completed"],
        "errors": s["errors"],
        "not_sent": s.get("not_sent", 0),  # kept from starting by the phase's time bound
    }


def div(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0 (a phase that produced nothing)."""
    return None if a is None or not b else a / b


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def static_vs_continuous_steps(lengths: list[int], batch: int) -> tuple[int, int]:
    """Decode steps the requests' output `lengths` take in static batches of `batch` (each
    runs until its longest request is done) and in a closed loop of `batch` slots (a request
    takes the first free slot, in arrival order): what equal step costs would give."""
    static = sum(max(lengths[i : i + batch]) for i in range(0, len(lengths), batch))
    slots = [0] * batch
    for k in lengths:
        heapq.heappush(slots, heapq.heappop(slots) + k)
    return static, max(slots)


def compose(
    naive_runs: list[NaiveResult],
    costs: dict[str, float],
    srv: dict,
    levels: tuple[int, ...],
    costs_b1: dict[str, float] | None = None,
    engine_step_seconds: dict[int, float] | None = None,
    static: NaiveResult | None = None,
    workload_lengths: list[int] | None = None,
) -> dict:
    """The JSON result from the raw measurements.

    `engine_step_seconds`: the engine's decode-only step time by batch size (1 and 16);
    `static`: the naive static-batch run of the mixed workload whose output lengths are
    `workload_lengths`, and which the server ran as `eft_workload_c16`."""
    runs: dict[str, LoadRun] = srv["runs"]
    all_tput = {k: r.summary()["output_token_throughput"] for k, r in runs.items()}
    # Repeated phases (`eft_c16`, `eft_c16_r1`, ...) count with their best run.
    best: dict[str, str] = {}
    for key, value in all_tput.items():
        kind = key.split("_r")[0]
        if kind not in best or value > all_tput[best[kind]]:
            best[kind] = key
    runs = {kind: runs[key] for kind, key in best.items()}
    tput = {kind: all_tput[key] for kind, key in best.items()}
    naive = max(naive_runs, key=lambda n: n.output_token_throughput)
    coeff_models = naive.models  # the models the EFT composition runs, base first
    res: dict = {}
    c16 = tput.get("eft_c16", 0.0)
    res["batched_vs_sequential"] = div(c16, naive.output_token_throughput)
    res["batched"] = {
        "naive_output_token_throughput": naive.output_token_throughput,
        "naive_requests": naive.requests,
        "naive_runs_output_token_throughput": [n.output_token_throughput for n in naive_runs],
        "naive_models": naive.models,
        "server_output_token_throughput": {
            str(c): tput[f"eft_c{c}"] for c in (1, 4, 16) if f"eft_c{c}" in tput
        },
    }
    res["eft_vs_base"] = div(c16, tput.get("base_c16"))
    large = naive.models[0]
    ideal = div(costs[large], sum(costs[m] for m in coeff_models))
    res["ideal_ratio"] = ideal
    res["eft_vs_ideal"] = div(res["eft_vs_base"], ideal)
    res["forward_cost_ms"] = {m: 1000 * v for m, v in costs.items()}
    if costs_b1:
        # What batching can gain at most on this machine: 16 one-row steps of the models the
        # composition runs vs one 16-row step. A compute-bound CPU caps batched_vs_sequential.
        res["forward_cost_ms_batch1"] = {m: 1000 * v for m, v in costs_b1.items()}
        res["batching_ceiling_c16"] = div(
            16 * sum(costs_b1[m] for m in coeff_models), sum(costs[m] for m in coeff_models)
        )
    fm = srv.get("forward_from_metrics") or {}
    if fm and large in fm and all(m in fm for m in coeff_models):
        ideal_m = div(fm[large][0], sum(fm[m][0] for m in coeff_models))
        res["ideal_ratio_from_metrics"] = ideal_m
        res["eft_vs_ideal_from_metrics"] = div(res["eft_vs_base"], ideal_m)
        res["forward_ms_from_metrics"] = {m: 1000 * v[0] for m, v in fm.items()}
    res["c16_runs_output_token_throughput"] = {
        k: v for k, v in all_tput.items() if k.startswith(("eft_c16", "base_c16"))
    }
    res["loadavg_1min_per_phase"] = srv["loadavg"]
    res["eft_tokens_per_s_c16"] = c16
    res["base_tokens_per_s_c16"] = tput.get("base_c16")
    res["eft_mixed_tokens_per_s_c16"] = tput.get("eft_mixed_c16")
    res["scaling"] = {str(c): level_row(runs[f"eft_c{c}"]) for c in levels}
    res["base_c16"] = level_row(runs["base_c16"])
    res["eft_mixed_c16"] = level_row(runs["eft_mixed_c16"])
    res["rss_growth"] = div(srv["rss_after_1000"], srv["rss_after_100"])
    res["memory"] = {
        "rss_idle_bytes": srv["rss_idle_bytes"],
        "peak_rss_bytes": srv["peak_rss_bytes"],
        "kv_bytes_at_peak": srv["kv_bytes_at_peak"],
        "kv_bytes_start": srv["kv_bytes_start"],
        "kv_bytes_idle": srv["kv_bytes_idle"],
        "kv_bytes_idle_after_rss": srv["kv_bytes_idle_after_rss"],
        "rss_after_100": srv["rss_after_100"],
        "rss_after_1000": srv["rss_after_1000"],
        "rss_requests_completed": srv["rss_requests"],
    }
    s16 = res["scaling"].get("16")
    res["itl_p99_over_p50_c16"] = div(s16["itl_p99_ms"], s16["itl_p50_ms"]) if s16 else None
    if engine_step_seconds and 1 in engine_step_seconds and 16 in engine_step_seconds:
        # What batching 16 rows can gain at most in this engine on this machine.
        res["engine_step_ms"] = {str(b): 1000 * v for b, v in engine_step_seconds.items()}
        res["batching_limit"] = div(16 * engine_step_seconds[1], engine_step_seconds[16])
        res["batching_efficiency"] = div(res["batched_vs_sequential"], res["batching_limit"])
    if static is not None and "eft_workload_c16" in runs:
        served = level_row(runs["eft_workload_c16"])
        res["vs_static_batch"] = div(
            served["output_token_throughput"], static.output_token_throughput
        )
        res["static_batch"] = {
            "requests": static.requests,
            "requested_tokens": static.output_tokens,
            "naive_seconds": static.seconds,
            "naive_output_token_throughput": static.output_token_throughput,
            "server": served,
        }
        if workload_lengths:
            steps_static, steps_continuous = static_vs_continuous_steps(workload_lengths, 16)
            res["static_batch"]["decode_steps_static"] = steps_static
            res["static_batch"]["decode_steps_continuous"] = steps_continuous
            res["vs_static_batch_equal_step_cost"] = steps_static / steps_continuous
    if "eft_poisson_c16" in runs:
        run = runs["eft_poisson_c16"]
        res["poisson_c16"] = level_row(run) | {"rate": run.config.rate}
        p = res["poisson_c16"]
        res["itl_p99_over_p50_poisson"] = div(p["itl_p99_ms"], p["itl_p50_ms"])
    res["targets"] = {}
    for key, (op, bound) in TARGETS.items():
        value = res.get(key)
        met = value is not None and (value >= bound if op == ">=" else value <= bound)
        res["targets"][key] = {"value": value, "target": f"{op} {bound}", "met": met}
    # KV memory returns to its idle size once load stops (issue 6).
    start = sum(srv["kv_bytes_start"].values())
    idle = sum(srv["kv_bytes_idle_after_rss"].values())
    res["targets"]["kv_idle_bytes"] = {
        "value": idle,
        "target": f"<= {start:.0f} (before load)",
        "met": idle <= start,
    }
    return res


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def format_table(res: dict) -> str:
    b = res["batched"]
    lines = [
        f"{' eft-serve benchmarks (' + res['plan'] + ') ':=^78}",
        f"machine: {res['machine']['label']}",
        f"family: {res['family']['summary']}",
        "",
    ]

    def row(label: str, value: str, note: str = "") -> None:
        lines.append(f"  {label:<48}{value:>14}  {note}")

    row(
        "naive HF generate + EFT LogitsProcessor",
        f"{b['naive_output_token_throughput']:.1f}",
        "tok/s, one request at a time",
    )
    for c, v in b["server_output_token_throughput"].items():
        row(f"eft-serve EFT, concurrency {c}", f"{v:.1f}", "tok/s")
    t = res["targets"]

    def mark(key: str) -> str:
        return f"target {t[key]['target']}: {'met' if t[key]['met'] else 'MISSED'}"

    if res.get("batching_ceiling_c16") is not None:
        row(
            "batching ceiling: 16 x step(1 row) / step(16)",
            fmt(res["batching_ceiling_c16"], ".2f") + "x",
            "direct forward timings",
        )
    row(
        "batched_vs_sequential (c=16 / naive)",
        fmt(res["batched_vs_sequential"], ".2f") + "x",
        mark("batched_vs_sequential"),
    )
    if res.get("batching_limit") is not None:
        e = res["engine_step_ms"]
        row("engine decode step, batch 1 / batch 16", f"{e['1']:.2f} / {e['16']:.2f}", "ms")
        row(
            "batching_limit: 16 x step(1) / step(16), engine",
            fmt(res["batching_limit"], ".2f") + "x",
        )
        row(
            "batching_efficiency (batched_vs_seq / limit)",
            fmt(res["batching_efficiency"], ".3f"),
            mark("batching_efficiency"),
        )
    if res.get("vs_static_batch") is not None:
        sb = res["static_batch"]
        row(
            f"mixed workload ({sb['requests']} requests): naive static 16",
            f"{sb['naive_output_token_throughput']:.1f}",
            "requested tok/s",
        )
        row(
            "mixed workload: eft-serve, c=16",
            f"{sb['server']['output_token_throughput']:.1f}",
            f"tok/s, {sb['server']['errors']} errors, {sb['server']['not_sent']} not sent",
        )
        row("vs_static_batch", fmt(res["vs_static_batch"], ".2f") + "x", mark("vs_static_batch"))
        row(
            "  the same at equal step costs (steps ratio)",
            fmt(res.get("vs_static_batch_equal_step_cost"), ".2f") + "x",
        )
    if res.get("poisson_c16"):
        p = res["poisson_c16"]
        row(
            f"Poisson {fmt(p['rate'], '.2f')} req/s, <=16 in flight: ITL p50/p99",
            f"{p['itl_p50_ms']:.1f} / {p['itl_p99_ms']:.1f}",
            f"ms, {p['errors']} errors, {p['not_sent']} not sent",
        )
        row(
            "itl_p99_over_p50_poisson",
            fmt(res["itl_p99_over_p50_poisson"], ".2f"),
            mark("itl_p99_over_p50_poisson"),
        )
    row(
        "large-base alone through the server, c=16",
        fmt(res["base_tokens_per_s_c16"], ".1f"),
        "tok/s",
    )
    row(
        "EFT mixed knobs (all 4 models), c=16",
        fmt(res["eft_mixed_tokens_per_s_c16"], ".1f"),
        "tok/s",
    )
    row("eft_vs_base (EFT / large-base, c=16)", fmt(res["eft_vs_base"], ".3f"))
    row(
        "ideal ratio cost(L)/(cost(L)+sum small)",
        fmt(res["ideal_ratio"], ".3f"),
        "direct forward timings, batch 16",
    )
    row("eft_vs_ideal", fmt(res["eft_vs_ideal"], ".3f"), mark("eft_vs_ideal"))
    if "eft_vs_ideal_from_metrics" in res:
        row(
            "eft_vs_ideal (costs from /metrics)",
            fmt(res["eft_vs_ideal_from_metrics"], ".3f"),
            "ideal " + fmt(res["ideal_ratio_from_metrics"], ".3f"),
        )
    lines += [
        "",
        f"  {'concurrency':>11} {'tok/s':>9} {'ITL p50 ms':>11} {'ITL p99 ms':>11} "
        f"{'p99/p50':>8} {'TTFT p50 ms':>12} {'errors':>7}",
    ]
    for c, r in res["scaling"].items():
        ratio = div(r["itl_p99_ms"], r["itl_p50_ms"])
        lines.append(
            f"  {c:>11} {r['output_token_throughput']:>9.1f} {r['itl_p50_ms']:>11.1f} "
            f"{r['itl_p99_ms']:>11.1f} {fmt(ratio, '.2f'):>8} {r['ttft_p50_ms']:>12.1f} "
            f"{r['errors']:>7}"
        )
    if res["itl_p99_over_p50_c16"] is not None:
        row(
            "ITL p99 / p50 at c=16",
            fmt(res["itl_p99_over_p50_c16"], ".2f"),
            mark("itl_p99_over_p50_c16"),
        )
    m = res["memory"]
    lines.append("")
    row("server RSS idle", mib(m["rss_idle_bytes"]))
    for phase, v in m["peak_rss_bytes"].items():
        row(f"peak RSS {phase}", mib(v))
    peak_phase = max(
        m["kv_bytes_at_peak"], key=lambda p: sum(m["kv_bytes_at_peak"][p].values()), default=None
    )
    if peak_phase:
        for model, v in m["kv_bytes_at_peak"][peak_phase].items():
            row(f"KV bytes at peak ({peak_phase}) {model}", mib(v))
    row("KV bytes before load (all models)", mib(sum(m["kv_bytes_start"].values())))
    row("KV bytes idle after load (all models)", mib(sum(m["kv_bytes_idle"].values())))
    row(
        "KV bytes idle after the leak check",
        mib(sum(m["kv_bytes_idle_after_rss"].values())),
        mark("kv_idle_bytes"),
    )
    row(
        f"RSS after 100 / {m['rss_requests_completed']} requests",
        f"{mib(m['rss_after_100'])} / {mib(m['rss_after_1000'])}",
    )
    row("rss_growth", fmt(res["rss_growth"], ".3f"), mark("rss_growth"))
    if res.get("spec_speedup_b1") is not None:
        lines.append("")
        row("spec_speedup_b1 (greedy, batch 1)", fmt(res["spec_speedup_b1"], ".2f") + "x")
        row(
            "spec_speedup_b1 at temperature 1",
            fmt(res["spec_speedup_b1_temperature_1"], ".2f") + "x",
        )
        row("spec_acceptance (accepted / drafted)", fmt(res["spec_acceptance"], ".2f"))
        row("spec_speedup_c16 (auto / off)", fmt(res["spec_speedup_c16"], ".2f") + "x")
    if res.get("structured_overhead") is not None:
        row(
            "structured_overhead (JSON Schema / none)",
            fmt(res["structured_overhead"], ".3f") + "x",
            "tok/s, 16 prompts at once",
        )
    if res.get("adapter_step_ratio_b16") is not None:
        a = res["adapters"]
        note = f"{a['adapters']} LoRA experts of rank {a['rank']}"
        row(
            "adapter_step_ratio_b1 (merged / adapters)",
            fmt(res["adapter_step_ratio_b1"], ".2f") + "x",
            note,
        )
        row("adapter_step_ratio_b16", fmt(res["adapter_step_ratio_b16"], ".2f") + "x", note)
        for b in ("b1", "b16"):
            key = f"adapter_forward_ratio_{b}"
            row(f"{key} (reference + experts)", fmt(res[key], ".2f") + "x", note)
    if res.get("kv_bytes_over_needed") is not None:
        row(
            "kv_bytes_over_needed (1 long + 15 short, peak)",
            fmt(res["kv_bytes_over_needed"], ".3f") + "x",
            "bytes in use / bytes the tokens need",
        )
        pre = res["preemption"]
        row(
            f"preemption: {pre['requests']} mixed requests, a quarter pool",
            f"{pre['preemptions']}",
            f"preemptions; same output as a large pool: {pre['same_output']}",
        )
        pk = res["kv"]["prefix"]
        row(
            f"prefix cache: {pk['settings']} knob settings x {pk['prompts']} prompts",
            fmt(pk["computed_over_submitted"], ".3f"),
            "prompt tokens computed / looked up",
        )
        row(
            "prefix_cache_speedup (wall, cache off / on)",
            fmt(res["prefix_cache_speedup"], ".2f") + "x",
            f"same output: {pk['same_output']}",
        )
    if res.get("step_vs_baseline") is not None:
        bl = res["baseline"]
        row(
            f"step_vs_baseline (engine at {bl['ref']} / now)",
            fmt(res["step_vs_baseline"], ".2f") + "x",
            "> 1: a decode step is cheaper now",
        )
        for key in ("http_burst", "http_mixed"):
            if key in bl:
                row(
                    f"  {key} tokens/s, now / {bl['ref']}",
                    fmt(bl[key].get("throughput_vs_baseline"), ".2f") + "x",
                )
    if res.get("goodput") is not None:
        row(
            "goodput (req/s meeting TTFT and ITL objectives)",
            fmt(res["goodput"], ".2f"),
            f"TTFT <= {res['goodput_slo']['ttft_ms']:g} ms, ITL <= "
            f"{res['goodput_slo']['itl_ms']:g} ms",
        )
    loads = ", ".join(f"{k} {v:.1f}" for k, v in res["loadavg_1min_per_phase"].items())
    lines += [
        "",
        f"1-min load average at the end of each phase (2 cores; above 2 = other work): {loads}",
        f"total bench time {res['bench_seconds']:.0f} s",
        "reproduce: " + res["command"],
    ]
    return "\n".join(lines)


def format_markdown(res: dict) -> str:
    """The headline figures as a Markdown table, for the README's Performance section."""
    b, t = res["batched"], res["targets"]

    def met(key: str) -> str:
        return f"{t[key]['target']} ({'met' if t[key]['met'] else 'missed'})"

    rows = [
        (
            "naive HF `generate` + EFT `LogitsProcessor`, one request at a time",
            fmt(b["naive_output_token_throughput"], ".2f") + " tok/s",
            "",
        ),
        *[
            (f"eft-serve EFT, concurrency {c}", f"{v:.2f} tok/s", "")
            for c, v in b["server_output_token_throughput"].items()
        ],
        (
            "batching ceiling: 16 × step(1 row) ÷ step(16 rows), models timed directly",
            fmt(res.get("batching_ceiling_c16"), ".2f") + "x",
            "",
        ),
        (
            "`batched_vs_sequential` (c=16 ÷ naive)",
            fmt(res["batched_vs_sequential"], ".2f") + "x",
            met("batched_vs_sequential"),
        ),
        (
            "engine decode step at batch 1 / batch 16",
            " / ".join(fmt(res.get("engine_step_ms", {}).get(b), ".2f") for b in ("1", "16"))
            + " ms",
            "",
        ),
        (
            "`batching_limit`: 16 × engine step(1 row) ÷ step(16 rows)",
            fmt(res.get("batching_limit"), ".2f") + "x",
            "",
        ),
        (
            "`batching_efficiency` (`batched_vs_sequential` ÷ `batching_limit`)",
            fmt(res.get("batching_efficiency"), ".3f"),
            met("batching_efficiency"),
        ),
        (
            "mixed workload: naive EFT loop, static batches of 16",
            fmt(res.get("static_batch", {}).get("naive_output_token_throughput"), ".2f") + " tok/s",
            "",
        ),
        (
            "mixed workload: eft-serve, c=16",
            fmt(
                res.get("static_batch", {}).get("server", {}).get("output_token_throughput"),
                ".2f",
            )
            + " tok/s",
            "",
        ),
        (
            "`vs_static_batch` (equal step costs would give "
            + fmt(res.get("vs_static_batch_equal_step_cost"), ".2f")
            + "x)",
            fmt(res.get("vs_static_batch"), ".2f") + "x",
            met("vs_static_batch"),
        ),
        (
            "ITL p99 ÷ p50, mixed workload, Poisson arrivals, ≤ 16 in flight",
            fmt(res.get("itl_p99_over_p50_poisson"), ".2f"),
            met("itl_p99_over_p50_poisson"),
        ),
        (
            "large base alone through the server, c=16",
            fmt(res["base_tokens_per_s_c16"], ".2f") + " tok/s",
            "",
        ),
        (
            "EFT with mixed knobs (all four models), c=16",
            fmt(res["eft_mixed_tokens_per_s_c16"], ".2f") + " tok/s",
            "",
        ),
        ("`eft_vs_base` (EFT ÷ large base, c=16)", fmt(res["eft_vs_base"], ".3f"), ""),
        (
            "ideal ratio cost(L) ÷ (cost(L) + Σ cost(small)), batch 16",
            fmt(res["ideal_ratio"], ".3f"),
            "",
        ),
        ("`eft_vs_ideal`", fmt(res["eft_vs_ideal"], ".3f"), met("eft_vs_ideal")),
        (
            "`eft_vs_ideal` with costs from `/metrics`",
            fmt(res.get("eft_vs_ideal_from_metrics"), ".3f"),
            "",
        ),
        (
            "ITL p99 ÷ p50 at c=16",
            fmt(res["itl_p99_over_p50_c16"], ".2f"),
            met("itl_p99_over_p50_c16"),
        ),
        (
            "`rss_growth` (RSS after 1,000 requests ÷ after 100)",
            fmt(res["rss_growth"], ".3f"),
            met("rss_growth"),
        ),
        ("KV bytes once idle", f"{t['kv_idle_bytes']['value']:.0f}", met("kv_idle_bytes")),
    ]
    out = ["| measurement | value | target |", "| --- | ---: | --- |"]
    out += [f"| {a} | {v} | {n} |" for a, v, n in rows]
    out += [
        "",
        "| concurrency | tok/s | ITL p50 ms | ITL p99 ms | TTFT p50 ms |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for c, r in res["scaling"].items():
        out.append(
            f"| {c} | {r['output_token_throughput']:.2f} | {r['itl_p50_ms']:.0f} | "
            f"{r['itl_p99_ms']:.0f} | {r['ttft_p50_ms']:.0f} |"
        )
    return "\n".join(out)
