"""The cost of structured outputs: tokens/s with a JSON Schema / without, same prompts, batch 16.

    python -m loadtest.structured_bench [--config FAMILY.yaml] [--max-tokens 64] [--rounds 3]

One in-process `Engine` (speculation off, so the figure is the grammar's own cost) runs the
same 16 prompts at once, with the up-scaling knobs, alternately unconstrained and under a JSON
Schema, round by round (a machine that slows down for a while slows both sides); the best round
of each side counts. The schema never completes within `max_tokens` (an array with more items
than fit) and the plain side ignores EOS, so both sides generate exactly `16 x max_tokens`
tokens and differ only by the grammar: the host-side mask per row and step, and applying it.
`loadtest.bench` reports the ratio as `structured_overhead`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import torch

from decoding.composition import make_composition
from decoding.engine import Engine, EngineConfig
from decoding.family import Family, load_family
from decoding.request import GenerationRequest, SamplingParams
from loadtest.naive import prompt_ids

DEMO = Path(__file__).resolve().parent.parent / "demo" / "family" / "family.yaml"
KNOBS = {"helpful": 1.0, "harmless": 0.0}
# Objects with a free-text field and an enum, in an array that cannot end within max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 100_000,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "kind": {"enum": ["city", "river", "king", "other"]},
                },
                "required": ["name", "kind"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["items"],
}


def _grammar() -> str:
    from llguidance import LLMatcher

    from server.formats import JSON_OPTIONS

    return LLMatcher.grammar_from_json_schema(SCHEMA, defaults=JSON_OPTIONS)


async def _round(
    engine: Engine, family: Family, prompts, max_tokens: int, grammar
) -> tuple[int, float]:
    """(tokens generated, tokens/s) of the prompts at once."""
    comp = make_composition(family, None, KNOBS)
    params = SamplingParams(
        max_tokens=max_tokens, temperature=1.0, ignore_eos=True, grammar=grammar
    )
    tag = "json" if grammar else "plain"
    reqs = [
        GenerationRequest(f"sb-{tag}-{i}-{time.monotonic_ns()}",
                          {m: p for m in comp.coeffs}, comp, params)
        for i, p in enumerate(prompts)
    ]  # fmt: skip
    t0 = time.perf_counter()
    tokens = 0
    for stream in engine.submit_all(reqs):
        async for out in stream:
            tokens += len(out.token_ids)
            if out.finish_reason == "error":
                raise RuntimeError(out.error)
    return tokens, tokens / (time.perf_counter() - t0)


def measure(family: Family, batch: int = 16, max_tokens: int = 64, rounds: int = 3) -> dict:
    """tokens/s of `batch` prompts at once with the JSON Schema and without (best of `rounds`
    each, alternating) and their ratio, `structured_overhead` (< 1: the schema costs)."""
    engine = Engine(family, EngineConfig(max_batch_size=batch, speculative="off"))
    prompts = prompt_ids(family, batch, 16, seed=7)
    grammar = _grammar()

    async def run() -> tuple[list, list]:
        await engine.warmup()
        await _round(engine, family, prompts, 4, grammar)  # compile, first-call allocations
        plain, constrained = [], []
        for _ in range(rounds):
            plain.append(await _round(engine, family, prompts, max_tokens, None))
            constrained.append(await _round(engine, family, prompts, max_tokens, grammar))
        await engine.shutdown()
        return plain, constrained

    plain, constrained = asyncio.run(run())
    return {
        "batch": batch,
        "max_tokens": max_tokens,
        "tokens": {"plain": [n for n, _ in plain], "json_schema": [n for n, _ in constrained]},
        "plain_tok_s": [r for _, r in plain],
        "json_schema_tok_s": [r for _, r in constrained],
        "structured_overhead": max(r for _, r in constrained) / max(r for _, r in plain),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.structured_bench",
                                description=__doc__.split("\n")[0])  # fmt: skip
    p.add_argument("--config", default=str(DEMO), help="family YAML (default: the demo family)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each side (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    family = load_family(args.config, device="cpu", dtype="float32")
    res = measure(family, max_tokens=args.max_tokens, rounds=args.rounds)
    res["command"] = " ".join(["python -m loadtest.structured_bench", *(argv or sys.argv[1:])])
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
