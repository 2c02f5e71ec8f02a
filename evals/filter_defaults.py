"""Which conservative filters (`base_top_p`, `plausibility`) keep a family's answers right.

    python -m evals.filter_defaults --config FAMILY.yaml --reference ENTRY \\
        [--questions capitals|demo|FILE.jsonl] [--base-top-p 1,0.95,0.9,0.8] \\
        [--plausibility 0,0.1,0.3] [--max-tokens 24] [--json out/filter_defaults.json]

Every question is asked as a chat, greedy, of the family's composition (its default expert
weights, each grid point's filters in place of the defaults' own) and of `ENTRY` alone: the
chat model for a real family, whose answer the composition should keep, or an oracle (the
demo's `large-helpful`, the large base really fine-tuned). Per grid point it reports, against
`ENTRY`'s answers: `first_token` (same first answer token), `same_answer` (identical text),
`fact_kept` (the expected answer appears, among the questions whose `ENTRY` answer holds it)
and `fact` (the expected answer appears, over all questions). Question sets: `capitals` (30
real-world capitals, for real checkpoints), `demo` (the demo family's held-out questions, the
first `--limit`), or a JSONL file of `{"question", "answer"}`. Runs in process on the engine
(no HTTP), all questions of a point batched together.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from decoding.composition import make_composition
from decoding.engine import Engine, EngineConfig
from decoding.family import FamilyConfig, load_family
from decoding.request import GenerationRequest, SamplingParams
from evals.outputs import default_out, prepare

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo",
    "Greece": "Athens", "Portugal": "Lisbon", "Austria": "Vienna", "Poland": "Warsaw",
    "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Hungary": "Budapest", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Peru": "Lima", "Chile": "Santiago", "Argentina": "Buenos Aires", "Kenya": "Nairobi",
    "Thailand": "Bangkok", "India": "New Delhi", "South Korea": "Seoul", "Turkey": "Ankara",
    "Australia": "Canberra", "the United Kingdom": "London",
}  # fmt: skip
DEMO_EVAL = Path(__file__).resolve().parent.parent / "demo" / "family" / "eval_set.json"


def questions(spec: str, limit: int) -> list[dict[str, str]]:
    if spec == "capitals":
        items = [
            {"question": f"What is the capital of {c}?", "answer": a} for c, a in CAPITALS.items()
        ]
    elif spec == "demo":
        items = json.loads(DEMO_EVAL.read_text())["questions"]
    else:
        items = [json.loads(line) for line in Path(spec).read_text().splitlines() if line.strip()]
    return items[:limit]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


async def _answers(engine, family, comp, items, max_tokens: int) -> list[list[int]]:
    async def one(i: int, item: dict[str, str]) -> list[int]:
        prompts = family.render_chat([{"role": "user", "content": item["question"]}])
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        out: list[int] = []
        async for ev in engine.submit(GenerationRequest(f"q{i}", prompts, comp, params)):
            out += ev.token_ids
        return out

    return await asyncio.gather(*(one(i, it) for i, it in enumerate(items)))


def score(reference: list[str], ref_ids, answers: list[str], ids, items) -> dict[str, float]:
    n = len(items)
    has = [it["answer"].lower() in a.lower() for it, a in zip(items, answers, strict=True)]
    ref_has = [it["answer"].lower() in a.lower() for it, a in zip(items, reference, strict=True)]
    kept = [h for h, r in zip(has, ref_has, strict=True) if r]
    return {
        "first_token": sum(a[:1] == r[:1] for a, r in zip(ids, ref_ids, strict=True)) / n,
        "same_answer": sum(a == r for a, r in zip(answers, reference, strict=True)) / n,
        "fact_kept": sum(kept) / len(kept) if kept else float("nan"),
        "fact": sum(has) / n,
        "reference_fact": sum(ref_has) / n,
    }


async def measure(args: argparse.Namespace) -> dict:
    family = load_family(FamilyConfig.from_yaml(args.config))
    if args.reference not in family.models:
        raise SystemExit(f"--reference {args.reference!r} is not an entry of {args.config}")
    items = questions(args.questions, args.limit)
    engine = Engine(family, EngineConfig(max_batch_size=len(items), speculative="off"))
    engine.start()
    tok = family.tokenizer

    def text(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=True)

    # The family's default expert weights; each grid point sets both filters.
    weights = {e: float(family.config.defaults.get(e, 0.0)) for e in family.config.experts}
    rows = []
    try:
        ref_comp = make_composition(family, args.reference)
        ref_ids = await _answers(engine, family, ref_comp, items, args.max_tokens)
        reference = [text(x) for x in ref_ids]
        for top_p in args.base_top_p:
            for alpha in args.plausibility:
                knobs = {**weights, "base_top_p": top_p, "plausibility": alpha}
                comp = make_composition(family, None, knobs)
                ids = await _answers(engine, family, comp, items, args.max_tokens)
                answers = [text(x) for x in ids]
                row = {"base_top_p": top_p, "plausibility": alpha,
                       **score(reference, ref_ids, answers, ids, items)}  # fmt: skip
                rows.append(row)
                print(_fmt(row), flush=True)
                if args.show:
                    for it, a, r in list(zip(items, answers, reference, strict=True))[: args.show]:
                        print(f"    {it['question']!r}: {a!r}  | alone: {r!r}")
    finally:
        await engine.shutdown()
    return {
        "config": str(args.config),
        "reference": args.reference,
        "questions": args.questions,
        "n": len(items),
        "max_tokens": args.max_tokens,
        "examples": [
            {"question": it["question"], "reference": r}
            for it, r in list(zip(items, reference, strict=True))[:5]
        ],  # fmt: skip
        "rows": rows,
    }


def _fmt(row: dict) -> str:
    return (
        f"base_top_p={row['base_top_p']:<5g} plausibility={row['plausibility']:<4g} "
        f"first_token={row['first_token']:.3f} same_answer={row['same_answer']:.3f} "
        f"fact_kept={row['fact_kept']:.3f} fact={row['fact']:.3f} "
        f"(alone: {row['reference_fact']:.3f})"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evals.filter_defaults", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--config", required=True, type=Path, help="family YAML")
    p.add_argument("--reference", required=True, help="the entry whose answers are the target")
    p.add_argument("--questions", default="capitals", help="capitals | demo | FILE.jsonl")
    p.add_argument("--limit", type=int, default=64, help="at most this many questions")
    p.add_argument(
        "--base-top-p",
        type=_floats,
        default=[1.0, 0.95, 0.9, 0.8],
        help="comma-separated base_top_p values (default 1,0.95,0.9,0.8)",
    )
    p.add_argument(
        "--plausibility",
        type=_floats,
        default=[0.0, 0.1, 0.3],
        help="comma-separated plausibility values (default 0,0.1,0.3)",
    )
    p.add_argument("--max-tokens", type=int, default=24, help="tokens per answer (default 24)")
    p.add_argument("--show", type=int, default=0, help="print this many answers per point")
    p.add_argument("--json", type=Path, default=None, help="default out/filter_defaults.json")
    args = p.parse_args(argv)
    result = asyncio.run(measure(args))
    out = prepare(args.json or default_out("filter_defaults.json"))
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
