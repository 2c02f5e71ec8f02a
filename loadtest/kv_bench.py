"""The paged KV cache on three workloads, in process, greedy, each against a reference run.

    python -m loadtest.kv_bench [--quick] [--only long-short,preemption,prefix] [--json OUT]

A random family whose base has 4 layers and small models 2 (context 4,096), built once:

- **long-short**: one long request (3,601 prompt tokens + 200) and 15 short ones (43 + 200) at
  once. `kv_bytes_over_needed`: the peak, over steps, of KV bytes in use (blocks held) over
  the bytes the held tokens need. Then the same workload with a pool of 1.5x the peak need:
  it must complete with the same greedy output (`fits_1_5x`, `same_output`).
- **preemption**: 48 mixed requests (prompts of 4-60 words, 8-128 output tokens, a few with
  n=2, mixed knobs) with a pool that holds a quarter of their tokens: every request must
  complete with the output of an unconstrained run; `preemptions` counts what it took.
- **prefix**: a knob sweep, 9 settings over the same 20 prompts of ~400 tokens, one setting
  after another, with the prefix cache and with `prefix_caching=False` (in alternation):
  `computed_over_submitted` (prompt tokens the models computed / looked up),
  `prefix_cache_speedup` (wall time without / with), `same_output`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from decoding.composition import make_composition
from decoding.engine import Engine, EngineConfig
from decoding.family import Family, load_family
from decoding.request import GenerationRequest, SamplingParams, StepStats
from loadtest.prompts import mixed_workload, random_text


def build_family(out: Path) -> Path:
    from demo.random_family import build_random_family

    return build_random_family(
        out, name="kv", large={"hidden": 64, "layers": 4, "heads": 4, "kv_heads": 2},
        small={"hidden": 32, "layers": 2, "heads": 2}, max_positions=4096,
    )  # fmt: skip


def entry_bytes(family: Family) -> dict[str, int]:
    """KV bytes per token of each entry (from the runners' probe of the real layers)."""
    engine = Engine(family, EngineConfig(kv_cache_memory=1 << 20))
    return {n: r.block_bytes_per_token for r, names in engine.groups for n in names}


def ids_of(family: Family, n_tokens: int, seed: int) -> list[int]:
    """A prompt of exactly `n_tokens` tokens (random words, cut)."""
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += family.tokenizer.encode(" " + random_text(rng, 50))
    return ids[:n_tokens]


def make_request(family, rid, ids, knobs, max_tokens, n=1) -> GenerationRequest:
    comp = make_composition(family, None, knobs)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, n=n)
    return GenerationRequest(rid, {m: ids for m in family.models}, comp, params)


def serve(family: Family, reqs, stagger: float = 0.0, sequential: bool = False, **cfg):
    """Outputs (token lists per request and sibling), step statistics, wall seconds."""
    steps: list[StepStats] = []
    engine = Engine(family, EngineConfig(**cfg), on_step=steps.append)

    async def one(i: int, req: GenerationRequest) -> list[list[int]]:
        await asyncio.sleep(stagger * i)
        out: dict[int, list[int]] = {}
        async for ev in engine.submit(req):
            out.setdefault(ev.index, []).extend(ev.token_ids)
            if ev.finish_reason not in (None, "length", "stop"):
                raise RuntimeError(f"{req.request_id}: {ev.finish_reason} {ev.error}")
        return [out[k] for k in sorted(out)]

    async def run() -> list:
        engine.start()
        try:
            if sequential:
                return [await one(0, r) for r in reqs]
            return await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))
        finally:
            await engine.shutdown()

    t0 = time.perf_counter()
    outs = asyncio.run(run())
    return outs, steps, time.perf_counter() - t0


def long_short(family: Family, quick: bool) -> dict:
    per_entry = entry_bytes(family)
    long_p, short_p, gen = (1200, 43, 64) if quick else (3601, 43, 200)
    knobs = {"helpful": 1.0, "harmless": 0.5}
    reqs = [make_request(family, "long", ids_of(family, long_p, 0), knobs, gen)]
    reqs += [make_request(family, f"s{i}", ids_of(family, short_p, i + 1), knobs, gen)
             for i in range(15)]  # fmt: skip
    unit = sum(per_entry.values())
    big = 2 * (long_p + 16 * (short_p + gen)) * unit
    ref, steps, _ = serve(family, reqs, kv_cache_memory=big)
    worst, peak_need = 0.0, 0
    for s in steps:
        need = sum(t * per_entry[n] for n, t in s.kv_cache_tokens.items())
        if need:
            worst = max(worst, sum(s.kv_cache_bytes.values()) / need)
            peak_need = max(peak_need, need)
    tight, steps, _ = serve(family, reqs, kv_cache_memory=int(1.5 * peak_need))
    return {
        "kv_bytes_over_needed": round(worst, 3),
        "peak_needed_bytes": peak_need,
        "pool_bytes_1_5x": int(1.5 * peak_need),
        "fits_1_5x": True,
        "same_output": tight == ref,
        "preemptions_1_5x": sum(s.preemptions for s in steps),
    }


def preemption(family: Family, quick: bool) -> dict:
    n = 16 if quick else 48
    unit = sum(entry_bytes(family).values())
    rng = random.Random(3)
    reqs, total = [], 0
    for i, (prompt, gen) in enumerate(mixed_workload(n, seed=1)):
        w = rng.random()
        siblings = 2 if i % 8 == 0 else 1
        ids = family.tokenizer.encode(prompt)
        reqs.append(make_request(family, f"m{i}", ids, {"helpful": w, "harmless": 1 - w}, gen,
                                 siblings))  # fmt: skip
        total += siblings * (len(ids) + gen)
    ref, _, ref_s = serve(family, reqs, stagger=0.005, kv_cache_memory=4 * total * unit)
    out, steps, tight_s = serve(family, reqs, stagger=0.005, kv_cache_memory=total * unit // 4)
    return {
        "requests": n,
        "pool_tokens_over_total": 0.25,
        "completed": len(out),
        "same_output": out == ref,
        "preemptions": sum(s.preemptions for s in steps),
        "seconds_quarter_pool": round(tight_s, 2),
        "seconds_large_pool": round(ref_s, 2),
    }


def prefix(family: Family, quick: bool) -> dict:
    n_prompts, length = (5, 200) if quick else (20, 400)
    settings = [{"helpful": w / 8, "harmless": 1 - w / 8} for w in range(9)]
    prompts = [ids_of(family, length, 100 + p) for p in range(n_prompts)]
    reqs = [make_request(family, f"{k}-{p}", ids, knobs, 8)
            for k, knobs in enumerate(settings) for p, ids in enumerate(prompts)]  # fmt: skip
    runs: dict[bool, list[float]] = {True: [], False: []}
    outs, stats = {}, {}
    for caching in (True, False, False, True):  # in alternation: the machine's drift cancels
        outs[caching], stats[caching], seconds = serve(
            family, reqs, sequential=True, prefix_caching=caching
        )
        runs[caching].append(seconds)
    looked_up = sum(sum(s.prefix_cache_queries.values()) for s in stats[True])
    found = sum(sum(s.prefix_cache_hits.values()) for s in stats[True])
    on, off = min(runs[True]), min(runs[False])
    return {
        "prompts": n_prompts,
        "settings": len(settings),
        "prompt_tokens": length,
        "computed_over_submitted": round((looked_up - found) / looked_up, 3),
        "prefix_cache_speedup": round(off / on, 2),
        "seconds_cached": round(on, 2),
        "seconds_uncached": round(off, 2),
        "same_output": outs[True] == outs[False],
    }


WORKLOADS = {"long-short": long_short, "preemption": preemption, "prefix": prefix}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.kv_bench",
                                 description=__doc__.split("\n\n")[0])  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="smaller workloads (a smoke test)")
    ap.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads")
    ap.add_argument("--config", help="family YAML (default: build the 4/2-layer random family)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    print(f"command: python -m loadtest.kv_bench {' '.join(argv or sys.argv[1:])}".rstrip())
    path = args.config or build_family(Path(tempfile.mkdtemp(prefix="eft-kv-bench-")))
    family = load_family(path)
    res: dict = {}
    for name in args.only.split(","):
        res[name] = WORKLOADS[name](family, args.quick)
        print(f"{name}: {json.dumps(res[name])}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
