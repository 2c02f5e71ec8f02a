"""The engine over its paged KV pools: memory that follows the tokens held, preemption that
loses nothing, the prefix cache, the refusal of requests that can never fit, and the
host-device synchronisations of a decode step."""

from __future__ import annotations

import asyncio

import pytest
import torch

# The tests folder is on sys.path (pytest's rootdir insertion), not a package.
from test_engine import PROMPTS, collect, request

from decoding.engine import Engine, EngineConfig
from decoding.request import RequestValidationError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def per_token_bytes(family) -> int:
    """KV bytes one token takes in every entry of the family (the pools' unit)."""
    return sum(entry_bytes(family).values())


def entry_bytes(family) -> dict[str, int]:
    """KV bytes per token of each entry of the family."""
    engine = Engine(family, EngineConfig(kv_cache_memory=1 << 20))
    return {n: r.block_bytes_per_token for r, names in engine.groups for n in names}


def text(n_words: int, seed: int) -> str:
    words = "river salt copper king north city founded trade road harbour bell stone".split()
    return " ".join(words[(seed * 7 + i * (seed + 3)) % len(words)] for i in range(n_words))


async def serve_all(engine: Engine, reqs, stagger: float = 0.0) -> list[dict]:
    engine.start()

    async def one(i, r):
        await asyncio.sleep(stagger * i)
        return await collect(engine, r)

    try:
        return await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))
    finally:
        await engine.shutdown()


def greedy(family, reqs, stagger: float = 0.0, **cfg) -> tuple[list[dict], list]:
    """Outputs of `reqs` on a fresh engine, and every step's statistics."""
    steps = []
    engine = Engine(family, EngineConfig(**cfg), on_step=steps.append)
    return asyncio.run(serve_all(engine, reqs, stagger)), steps


def tokens(outs: list[dict]) -> list[list[int]]:
    return [o[i]["tokens"] for o in outs for i in sorted(o)]


def test_kv_in_use_follows_the_tokens_held_not_the_longest_row(tiny_family):
    """One long prompt and seven short ones at once: the bytes in use stay within 1.3x what
    the held tokens need at every step; a pool of 1.5x the peak need serves them all with the
    same greedy output as a large pool."""
    per_entry = entry_bytes(tiny_family)
    unit = sum(per_entry.values())
    knobs = {"helpful": 1.0, "harmless": 0.5}
    reqs = [request(tiny_family, "long", text(90, 1), knobs, max_tokens=24, ignore_eos=True)]
    reqs += [
        request(tiny_family, f"s{i}", text(12, i + 2), knobs, max_tokens=24, ignore_eos=True)
        for i in range(7)
    ]
    big, steps = greedy(tiny_family, reqs, block_size=4, kv_cache_memory=4000 * unit)
    worst = peak_need = 0.0
    for s in steps:
        used = sum(s.kv_cache_bytes.values())
        need = sum(t * per_entry[n] for n, t in s.kv_cache_tokens.items())
        if need:
            worst = max(worst, used / need)
            peak_need = max(peak_need, need)
    assert 1.0 <= worst <= 1.3
    assert all(o[0]["finish"] == "length" for o in big)
    # Every entry holds the same tokens here: a pool of 1.5x the peak need in bytes.
    small, steps = greedy(tiny_family, reqs, block_size=4, kv_cache_memory=int(1.5 * peak_need))
    assert tokens(small) == tokens(big)


def test_a_pool_for_a_quarter_of_the_tokens_preempts_and_loses_nothing(tiny_family):
    """16 mixed requests (n=2 among them) whose tokens need 4x the pool: every request
    completes, none fails, the greedy outputs equal an unconstrained run's, and requests
    were preempted (their streams resumed without repeating or dropping a token)."""
    unit = per_token_bytes(tiny_family)
    reqs = []
    total = 0
    for i in range(16):
        words = 4 + (i * 11) % 40
        out = 8 + (i * 13) % 40
        n = 2 if i % 5 == 0 else 1
        knobs = [{"helpful": 1.0}, {"helpful": 0.5, "harmless": 0.5}, None][i % 3]
        r = request(tiny_family, f"m{i}", text(words, i), knobs, max_tokens=out, n=n,
                    ignore_eos=True)  # fmt: skip
        reqs.append(r)
        total += n * (len(r.prompt_ids["large-base"]) + out)
    free, _ = greedy(tiny_family, reqs, stagger=0.01, kv_cache_memory=8 * total * unit)
    quarter = total * unit // 4
    tight, steps = greedy(tiny_family, reqs, stagger=0.01, kv_cache_memory=quarter)
    assert sum(s.preemptions for s in steps) > 0
    assert all(o[i]["finish"] == "length" for o in tight for i in o)
    assert tokens(tight) == tokens(free)


def test_a_knob_sweep_prefills_each_prompt_once(tiny_family):
    """The same prompts under nine knob settings, one after another: each model computes a
    prompt's full blocks once (helpful joins at the second setting), so the prompt tokens the
    models compute are at most 0.2x those they look up; outputs equal a run without the
    cache."""
    settings = [{"helpful": w / 8, "harmless": 1 - w / 8} for w in range(9)]
    prompts = [text(80, s) for s in range(2)]
    reqs = [
        request(tiny_family, f"{p}-{k}", prompt, knobs, max_tokens=4, ignore_eos=True)
        for k, knobs in enumerate(settings)
        for p, prompt in enumerate(prompts)
    ]
    cached, steps = greedy(tiny_family, reqs, stagger=0.05)
    looked_up = sum(sum(s.prefix_cache_queries.values()) for s in steps)
    found = sum(sum(s.prefix_cache_hits.values()) for s in steps)
    assert looked_up == sum(len(r.prompt_ids["large-base"]) * len(r.composition.coeffs)
                            for r in reqs)  # fmt: skip
    assert looked_up - found <= 0.2 * looked_up
    uncached, steps = greedy(tiny_family, reqs, stagger=0.05, prefix_caching=False)
    assert not any(s.prefix_cache_queries for s in steps)
    assert tokens(cached) == tokens(uncached)


def test_turn_two_of_a_chat_prefills_only_its_new_tokens(tiny_family):
    first = request(tiny_family, "t1", text(40, 5), {"helpful": 1.0}, max_tokens=12,
                    ignore_eos=True)  # fmt: skip
    steps = []

    async def go():
        engine = Engine(tiny_family, EngineConfig(block_size=4), on_step=steps.append)
        engine.start()
        try:
            out = await collect(engine, first)
            history = first.prompt_ids["large-base"] + out[0]["tokens"]
            follow = history + tiny_family.tokenizer.encode(" north city")
            second = request(tiny_family, "t2", "", {"helpful": 1.0}, max_tokens=2)
            second.prompt_ids = {m: follow for m in second.prompt_ids}
            mark = len(steps)
            await collect(engine, second)
            return len(history), len(follow), steps[mark:]
        finally:
            await engine.shutdown()

    held, total, turn_two = asyncio.run(go())
    computed = sum(s.prompt_tokens for s in turn_two)
    # The first turn's blocks (prompt and answer, but the last token, not yet in the KV)
    # come from the cache: at most a block's worth of them is computed again.
    assert computed <= total - held + 4


def test_a_request_that_can_never_fit_is_refused_at_submit(tiny_family):
    unit = per_token_bytes(tiny_family)

    async def go():
        engine = Engine(tiny_family, EngineConfig(kv_cache_memory=64 * unit))
        try:
            with pytest.raises(RequestValidationError, match="KV pool holds 64 tokens") as e:
                engine.submit(request(tiny_family, "big", PROMPTS[0], max_tokens=200))
            assert e.value.param == "max_tokens"
            ok = await collect(engine, request(tiny_family, "ok", PROMPTS[0], max_tokens=8))
            assert ok[0]["finish"] in ("length", "stop")
        finally:
            await engine.shutdown()

    asyncio.run(go())


def test_n_siblings_share_their_prompt_blocks(tiny_family):
    ids = tiny_family.tokenizer.encode(text(60, 9))
    steps = []

    async def go():
        engine = Engine(tiny_family, EngineConfig(block_size=8), on_step=steps.append)
        engine.start()
        try:
            req = request(tiny_family, "n", "", {"helpful": 1.0}, max_tokens=3, n=4,
                          temperature=1.0, seed=1)  # fmt: skip
            req.prompt_ids = {m: ids for m in req.prompt_ids}
            await collect(engine, req)
        finally:
            await engine.shutdown()

    asyncio.run(go())
    # The step the prompt completes: each of the 3 models holds the prompt's blocks once,
    # plus one copied partial block per extra sibling.
    first = next(s for s in steps if s.batch_size)
    blocks = -(-len(ids) // 8)
    per_model_bytes = first.kv_cache_bytes["large-base"] / (blocks + 3)
    assert per_model_bytes * (blocks + 3) == first.kv_cache_bytes["large-base"]
    assert first.kv_cache_tokens["large-base"] == 4 * len(ids)


def test_a_plain_decode_step_synchronises_once(tiny_family, monkeypatch):
    """The device -> host reads of a steady decode step (no join, no leave, no new block):
    only the sampled token ids (`tolist`). On CUDA each read is a synchronisation."""
    reads: list[str] = []
    counting = [False]
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def patched(self, *a, _name=name, _original=original, **k):
            if counting[0]:
                reads.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, patched)

    async def go():
        engine = Engine(tiny_family, EngineConfig(speculative="off", block_size=64))
        engine.start()
        original_step = engine.step
        per_step: list[int] = []

        def step():
            # Only steps that start with all four rows decoding are counted.
            steady = len(engine.scheduler.running) == 4 and not engine.scheduler.prefilling
            before = len(reads)
            counting[0] = steady
            try:
                original_step()
            finally:
                counting[0] = False
            if steady:
                per_step.append(len(reads) - before)

        engine.step = step
        try:
            reqs = [
                request(
                    tiny_family,
                    f"r{i}",
                    PROMPTS[i],
                    {"helpful": 1.0},
                    max_tokens=12,
                    ignore_eos=True,
                )  # fmt: skip
                for i in range(4)
            ]
            await asyncio.gather(*(collect(engine, r) for r in reqs))
        finally:
            await engine.shutdown()
        return per_step

    per_step = asyncio.run(go())
    assert len(per_step) >= 8 and set(per_step) == {1}
    assert set(reads) == {"tolist"}


@pytest.mark.parametrize("speculative", ["off", "3"])
def test_decode_graph_buffers_give_the_eager_outputs_with_speculation_and_n(
    tiny_family, speculative
):
    """`cuda_graphs="on"` (on a CPU: the graphs' persistent buffers, run eagerly) against
    eager decode, with drafts decoded through the buffers when speculating, `n` siblings and
    rows that join and finish at different steps: the same tokens and log-probs."""
    reqs = [
        request(tiny_family, f"g{i}", p, {"helpful": 0.5 * i}, max_tokens=6 + 5 * i, n=1 + i % 2,
                logprobs=1, ignore_eos=True)
        for i, p in enumerate(PROMPTS)
    ]  # fmt: skip
    cfg = dict(speculative=speculative, max_batch_size=8)
    on = Engine(tiny_family, EngineConfig(cuda_graphs="on", **cfg))
    assert all(r.graphs is not None for r, _ in on.groups)  # every runner decodes through them
    eager, _ = greedy(tiny_family, reqs, stagger=0.01, **cfg)
    replayed, _ = greedy(tiny_family, reqs, stagger=0.01, cuda_graphs="on", **cfg)
    assert tokens(replayed) == tokens(eager)
    for a, b in zip(replayed, eager):
        for i in a:
            torch.testing.assert_close(
                torch.tensor([x.logprob for x in a[i]["lps"]]),
                torch.tensor([x.logprob for x in b[i]["lps"]]), atol=1e-4, rtol=0,
            )  # fmt: skip
