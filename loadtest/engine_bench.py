"""Engine-level batching gain, without HTTP: 16 requests at once vs the same 16 one by one.

    python -m loadtest.engine_bench [--config FAMILY.yaml] [--requests 16] [--max-tokens 64]

Builds the tiny random family when no --config is given, runs the same seeded requests through
one `Engine` sequentially and then concurrently, and prints output tokens/s of both, their
ratio, and where the concurrent run's step time went (per-model forward, combine, sampling,
the rest = Python and bookkeeping), from the engine's own `StepStats`.

`decode_step_seconds` is what `loadtest.bench` uses for `batching_limit`: the engine's own
decode-step time at batch 1 and at batch 16.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable

import torch

from decoding.composition import make_composition
from decoding.engine import Engine, EngineConfig
from decoding.family import Family, load_family
from decoding.request import GenerationRequest, SamplingParams, StepStats


class StepProfile:
    """Sums the engine's per-step timings."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.forward: dict[str, float] = defaultdict(float)
        self.combine = self.sample = self.total = 0.0

    def __call__(self, s: StepStats) -> None:
        if not s.batch_size:
            return
        self.steps += 1
        for name, sec in s.forward_seconds.items():
            self.forward[name] += sec
        self.combine += s.combine_seconds
        self.sample += s.sample_seconds
        self.total += s.step_seconds

    def table(self) -> str:
        ms = lambda x: 1e3 * x / max(self.steps, 1)  # noqa: E731
        rest = self.total - sum(self.forward.values()) - self.combine - self.sample
        rows = [(f"forward {n}", v) for n, v in self.forward.items()]
        rows += [("combine", self.combine), ("sample", self.sample), ("other (python)", rest)]
        lines = [f"  {'mean per step':<24} {ms(self.total):8.2f} ms   ({self.steps} steps)"]
        lines += [f"  {k:<24} {ms(v):8.2f} ms  {100 * v / self.total:5.1f}%" for k, v in rows]
        return "\n".join(lines)


class DecodeSteps:
    """Collects `step_seconds` of the steps that only decode, keyed by batch size.

    A step that prefills any prompt tokens is left out: its cost depends on the prompts, not on
    how many rows decode."""

    def __init__(self) -> None:
        self.seconds: dict[int, list[float]] = defaultdict(list)

    def __call__(self, s: StepStats) -> None:
        if s.batch_size and not s.prompt_tokens:
            self.seconds[s.batch_size].append(s.step_seconds)


def decode_step_seconds(
    family: Family,
    knobs: dict[str, float],
    prompts: list[list[int]],
    max_tokens: int,
    batches: tuple[int, ...] = (1, 16),
    rounds: int = 2,
    also: Callable[[StepStats], None] | None = None,
) -> dict[int, float]:
    """Median seconds of one decode-only engine step with `b` rows, for each `b` in `batches`.

    `b` requests of `max_tokens` tokens (prompts taken from `prompts`, composition from `knobs`)
    run together through an in-process `Engine`, so every decode step has exactly `b` rows; the
    batch sizes take turns `rounds` times, so a burst of load on a shared machine hits all alike.
    `also` sees every step's statistics too.
    """
    steps = DecodeSteps()

    def observe(s: StepStats) -> None:
        steps(s)
        if also is not None:
            also(s)

    engine = Engine(family, EngineConfig(max_batch_size=max(batches)), on_step=observe)
    comp = make_composition(family, None, knobs)

    async def drain(i: int) -> None:
        params = SamplingParams(max_tokens=max_tokens, seed=i, ignore_eos=True, logprobs=0)
        ids = prompts[i % len(prompts)]
        req = GenerationRequest(f"b{i}", {m: ids for m in family.models}, comp, params)
        async for _ in engine.submit(req):
            pass

    async def measure() -> None:
        engine.start()
        try:
            await engine.warmup()
            for _ in range(rounds):
                for b in batches:
                    await asyncio.gather(*(drain(i) for i in range(b)))
        finally:
            await engine.shutdown()

    asyncio.run(measure())
    return {b: statistics.median(steps.seconds[b]) for b in batches}


async def run(args: argparse.Namespace) -> None:
    if args.config:
        path = args.config
    else:
        import transformers

        from demo.random_family import build_random_family

        transformers.utils.logging.disable_progress_bar()
        path = build_random_family(tempfile.mkdtemp(prefix="eft-engine-bench-"))
    family = load_family(path)
    prof = StepProfile()
    config = EngineConfig(max_batch_size=max(32, args.requests))
    if args.speculative:
        config.speculative = args.speculative
    engine = Engine(family, config, on_step=prof)
    engine.start()
    await engine.warmup()
    comp = make_composition(
        family, None, {e: 1.0 / len(family.config.experts) for e in family.config.experts}
    )

    def request(i: int) -> GenerationRequest:
        ids = family.tokenizer.encode(f"request {i}: the river city of salt and copper")
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=0.8, seed=i, ignore_eos=True
        )
        return GenerationRequest(f"r{i}", {m: ids for m in family.models}, comp, params)

    async def drain(req: GenerationRequest) -> int:
        return sum([len(out.token_ids) async for out in engine.submit(req)])

    t0 = time.perf_counter()
    sequential = [await drain(request(i)) for i in range(args.requests)]
    seq_tps = sum(sequential) / (time.perf_counter() - t0)
    prof.reset()
    t0 = time.perf_counter()
    together = await asyncio.gather(*[drain(request(i)) for i in range(args.requests)])
    conc_tps = sum(together) / (time.perf_counter() - t0)
    await engine.shutdown()
    print(f"command: python -m loadtest.engine_bench {' '.join(sys.argv[1:])}".rstrip())
    print(f"family: {path}; torch threads {torch.get_num_threads()}")
    print(f"{args.requests} requests x {args.max_tokens} tokens")
    print(f"  one after another: {seq_tps:8.1f} output tokens/s")
    print(f"  all at once:       {conc_tps:8.1f} output tokens/s")
    print(f"  ratio:             {conc_tps / seq_tps:8.2f}x")
    print("where the concurrent run's step time goes:")
    print(prof.table())


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.engine_bench", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--config", help="family YAML (default: build the tiny random family)")
    ap.add_argument(
        "--requests",
        type=int,
        default=16,
        help="requests, run one after another and then all at once (default 16)",
    )
    ap.add_argument(
        "--max-tokens", type=int, default=64, help="output tokens of each request (default 64)"
    )
    ap.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (default 0: torch's own default)"
    )
    ap.add_argument(
        "--speculative",
        help="the engine's speculative setting (auto, off, K; default: the engine's own)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
