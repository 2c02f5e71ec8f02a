"""The engine against independent full-sequence computations on a tiny random family."""

from __future__ import annotations

import asyncio

import pytest
import torch

from decoding.composition import make_composition
from decoding.engine import Engine, EngineConfig
from decoding.family import FamilyError, load_family
from decoding.request import (
    GenerationRequest,
    QueueFullError,
    RequestValidationError,
    SamplingParams,
)

PROMPTS = ["the river city", "a king of salt and copper was founded", "café 東京 😀", "north"]


def run(coro):
    return asyncio.run(coro)


def request(family, rid, text, knobs=None, model=None, **params):
    ids = family.tokenizer.encode(text)
    comp = make_composition(family, model, knobs)
    params.setdefault("temperature", 0.0)
    return GenerationRequest(rid, {m: ids for m in family.models}, comp, SamplingParams(**params))


async def collect(engine, req):
    """All events of a request, merged per sibling: tokens, logprobs, text, finish."""
    out = {}
    async for ev in engine.submit(req):
        s = out.setdefault(ev.index, {"tokens": [], "lps": [], "text": "", "finish": None})
        s["tokens"] += ev.token_ids
        s["lps"] += ev.logprobs or []
        s["text"] += ev.text
        if ev.finish_reason:
            s["finish"] = ev.finish_reason
            s["error"] = ev.error
        if ev.prompt_logprobs is not None:
            s["prompt_logprobs"] = ev.prompt_logprobs
    return out


async def started(family, **cfg):
    engine = Engine(family, EngineConfig(**cfg))
    engine.start()
    return engine


@torch.inference_mode()
def reference_logprobs(family, coeffs, ids):
    """Composed log-probs at every position of `ids`, from full-sequence forwards (no cache)."""
    v = family.vocab_size
    total = 0
    for name, c in coeffs.items():
        logits = family.models[name].module(torch.tensor([ids])).logits[0, :, :v].float()
        total = total + c * torch.log_softmax(logits, -1).clamp_min(-1e4)
    return torch.log_softmax(total, -1)


@pytest.mark.parametrize(
    "knobs",
    [
        {"helpful": 1.0},
        {"helpful": 0.7, "harmless": 0.3},
        {"helpful": 2.5, "harmless": 1.5},
        {"helpful": 0.0, "harmless": 0.0},
    ],
)
def test_composed_logprobs_equal_full_sequence_computation(tiny_family, knobs):
    req = request(tiny_family, "r", PROMPTS[1], knobs, max_tokens=8, logprobs=3, ignore_eos=True)

    async def go():
        engine = await started(tiny_family)
        try:
            return await collect(engine, req)
        finally:
            await engine.shutdown()

    out = run(go())[0]
    prompt = req.prompt_ids["large-base"]
    ref = reference_logprobs(tiny_family, req.composition.coeffs, prompt + out["tokens"])
    assert len(out["tokens"]) == 8
    for t, (tok, lp) in enumerate(zip(out["tokens"], out["lps"], strict=True)):
        row = ref[len(prompt) - 1 + t]
        assert tok == int(row.argmax()), "greedy must pick the composed argmax"
        assert lp.logprob == pytest.approx(float(row[tok]), abs=1e-4)
        top_ids = [i for i, _ in lp.top]
        assert top_ids == row.topk(3).indices.tolist()
        for i, v in lp.top:
            assert v == pytest.approx(float(row[i]), abs=1e-4)


def test_all_zero_weights_is_the_large_base_alone(tiny_family):
    zero = make_composition(tiny_family, None, {"helpful": 0, "harmless": 0})
    assert zero.coeffs == {"large-base": 1.0}
    eft = make_composition(tiny_family, None, {"helpful": 1})
    assert eft.coeffs == {"large-base": 1.0, "helpful": 1.0, "small-base": -1.0}


def test_rows_with_different_lengths_and_knobs_match_running_alone(tiny_family):
    settings = [
        (PROMPTS[0], {"helpful": 1.0}),
        (PROMPTS[1], {"helpful": 0.2, "harmless": 0.8}),
        (PROMPTS[2], None),
        (PROMPTS[3], {"harmless": 3.0}),
    ]
    reqs = lambda tag: [  # noqa: E731
        request(tiny_family, f"{tag}{i}", p, k, max_tokens=10, logprobs=2, ignore_eos=True)
        for i, (p, k) in enumerate(settings)
    ]
    late = lambda tag: request(  # noqa: E731
        tiny_family,
        f"{tag}-late",
        PROMPTS[2],
        {"helpful": 0.5},
        max_tokens=6,
        logprobs=2,
        ignore_eos=True,
    )

    async def alone():
        engine = await started(tiny_family)
        try:
            return [await collect(engine, r) for r in reqs("a") + [late("a")]]
        finally:
            await engine.shutdown()

    async def together():
        engine = await started(tiny_family)
        try:
            first = reqs("b")
            stream = engine.submit(first[0])
            tasks = [asyncio.create_task(collect(engine, r)) for r in first[1:]]
            head = [await stream.__anext__() for _ in range(3)]  # 3 steps in: others run too
            tasks.append(asyncio.create_task(collect(engine, late("b"))))
            rest = [ev async for ev in stream]
            merged = {
                0: {
                    "tokens": [t for ev in head + rest for t in ev.token_ids],
                    "lps": [lp for ev in head + rest for lp in ev.logprobs or []],
                }
            }
            return [merged, *await asyncio.gather(*tasks)]
        finally:
            await engine.shutdown()

    solo, batched = run(alone()), run(together())
    for a, b in zip(solo, batched, strict=True):
        assert a[0]["tokens"] == b[0]["tokens"]
        for x, y in zip(a[0]["lps"], b[0]["lps"], strict=True):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def test_single_model_composition_runs_only_that_model(tiny_family):
    seen: set[str] = set()
    engine = Engine(tiny_family, on_step=lambda s: seen.update(s.forward_seconds))

    async def go():
        engine.start()
        try:
            return await collect(
                engine, request(tiny_family, "r", "the", model="helpful", max_tokens=4)
            )
        finally:
            await engine.shutdown()

    run(go())
    assert seen == {"helpful"}


def test_seeded_sampling_is_reproducible_with_different_companions(tiny_family):
    def seeded(rid):
        return request(
            tiny_family,
            rid,
            PROMPTS[0],
            {"helpful": 1.0},
            max_tokens=12,
            temperature=1.0,
            top_p=0.95,
            seed=1234,
            ignore_eos=True,
        )

    async def go(companions):
        engine = await started(tiny_family)
        try:
            others = [
                asyncio.create_task(
                    collect(
                        engine,
                        request(
                            tiny_family,
                            f"o{i}",
                            PROMPTS[i % 4],
                            {"harmless": 1.0},
                            max_tokens=12,
                            temperature=1.3,
                            ignore_eos=True,
                        ),
                    )
                )
                for i in range(companions)
            ]
            mine = await collect(engine, seeded(f"s{companions}"))
            await asyncio.gather(*others)
            return mine[0]["tokens"]
        finally:
            await engine.shutdown()

    alone, crowded = run(go(0)), run(go(5))
    assert alone == crowded
    assert len(set(alone)) > 1


def test_n_siblings_share_one_prefill_and_differ_when_sampled(tiny_family):
    async def go():
        engine = await started(tiny_family)
        try:
            greedy = await collect(
                engine, request(tiny_family, "g", PROMPTS[0], n=3, max_tokens=6, ignore_eos=True)
            )
            sampled = await collect(
                engine,
                request(
                    tiny_family,
                    "s",
                    PROMPTS[0],
                    n=3,
                    max_tokens=6,
                    temperature=1.5,
                    seed=7,
                    ignore_eos=True,
                ),
            )
            return greedy, sampled
        finally:
            await engine.shutdown()

    greedy, sampled = run(go())
    assert len({tuple(s["tokens"]) for s in greedy.values()}) == 1
    assert len({tuple(s["tokens"]) for s in sampled.values()}) > 1
    assert all(s["finish"] == "length" for s in sampled.values())


def test_cancel_frees_the_slot(tiny_family):
    async def go():
        engine = await started(tiny_family, max_batch_size=2)
        try:
            it = engine.submit(
                request(tiny_family, "long", PROMPTS[0], max_tokens=200, ignore_eos=True)
            )
            first = await it.__anext__()
            assert first.token_ids
            assert engine.num_running == 1
            await it.aclose()  # the consumer goes away: the request is cancelled
            for _ in range(200):
                if engine.num_running == 0:
                    break
                await asyncio.sleep(0.01)
            assert engine.num_running == 0
            # Both slots are free again.
            outs = await asyncio.gather(
                *[
                    collect(
                        engine,
                        request(
                            tiny_family, f"n{i}", PROMPTS[1], n=1, max_tokens=3, ignore_eos=True
                        ),
                    )
                    for i in range(2)
                ]
            )
            return outs
        finally:
            await engine.shutdown()

    outs = run(go())
    assert all(o[0]["finish"] == "length" for o in outs)


def test_freed_memory_is_handed_back_once_the_engine_has_been_idle(tiny_family, monkeypatch):
    import decoding.engine as engine_module

    trims: list[float] = []
    monkeypatch.setattr(engine_module, "release_freed_memory", lambda: trims.append(1))
    monkeypatch.setattr(engine_module, "TRIM_AFTER_IDLE_S", 0.2)

    async def go():
        engine = await started(tiny_family, idle_wait_s=0.05)
        try:
            await asyncio.sleep(0.4)
            assert not trims, "nothing to hand back before the first request"
            for i in range(2):  # back to back: no trim between requests
                await collect(engine, request(tiny_family, f"r{i}", PROMPTS[0], max_tokens=3))
            assert not trims
            await asyncio.sleep(0.6)
            assert len(trims) == 1, "one trim once idle, not one per idle check"
        finally:
            await engine.shutdown()

    run(go())


def test_stop_string_spanning_token_boundaries_is_cut(tiny_family):
    async def go(stop):
        engine = await started(tiny_family)
        try:
            return (
                await collect(
                    engine,
                    request(
                        tiny_family,
                        "r",
                        PROMPTS[1],
                        {"helpful": 1},
                        max_tokens=20,
                        ignore_eos=True,
                        stop=stop,
                    ),
                )
            )[0]
        finally:
            await engine.shutdown()

    free = run(go([]))
    tok = tiny_family.tokenizer
    pieces = [tok.decode([t]) for t in free["tokens"]]
    # A stop string made of the end of token 3 and the start of token 4.
    k = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and pieces[i + 1])
    stop = pieces[k][-1] + pieces[k + 1][:1]
    cut = free["text"].find(stop)
    stopped = run(go([stop]))
    assert stopped["finish"] == "stop"
    assert stopped["text"] == free["text"][:cut]
    assert stop not in stopped["text"]


def test_long_prompt_is_chunked_and_matches_whole_prefill(tiny_family):
    long_text = " ".join([PROMPTS[1]] * 6)

    async def go(budget):
        engine = await started(tiny_family, max_num_batched_tokens=budget)
        steps = []
        engine.on_step = lambda s: steps.append((s.prompt_tokens, s.batch_size))
        try:
            short = asyncio.create_task(
                collect(
                    engine,
                    request(tiny_family, "short", PROMPTS[0], max_tokens=30, ignore_eos=True),
                )
            )
            while engine.num_running < 1:
                await asyncio.sleep(0.001)
            out = await collect(
                engine,
                request(
                    tiny_family,
                    "long",
                    long_text,
                    {"helpful": 1},
                    max_tokens=5,
                    logprobs=1,
                    ignore_eos=True,
                ),
            )
            await short
            return out[0], steps
        finally:
            await engine.shutdown()

    whole, _ = run(go(4096))
    chunked, steps = run(go(8))
    assert chunked["tokens"] == whole["tokens"]
    for a, b in zip(chunked["lps"], whole["lps"], strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    # The short request kept decoding while the long prompt was prefilled 8 tokens a step.
    assert max(p for p, _ in steps) <= 8
    assert sum(1 for p, b in steps if p > 0 and b > 0) >= 3


def test_prompt_logprobs_equal_full_sequence_computation(tiny_family):
    req = request(
        tiny_family,
        "echo",
        PROMPTS[1],
        {"helpful": 0.6, "harmless": 0.4},
        max_tokens=0,
        prompt_logprobs=2,
    )

    async def go():
        engine = await started(tiny_family)
        try:
            return (await collect(engine, req))[0]
        finally:
            await engine.shutdown()

    out = run(go())
    ids = req.prompt_ids["large-base"]
    ref = reference_logprobs(tiny_family, req.composition.coeffs, ids)
    plp = out["prompt_logprobs"]
    assert out["finish"] == "length" and out["tokens"] == []
    assert plp[0] is None and len(plp) == len(ids)
    for t in range(1, len(ids)):
        assert plp[t].token_id == ids[t]
        assert plp[t].logprob == pytest.approx(float(ref[t - 1, ids[t]]), abs=1e-4)
        assert [i for i, _ in plp[t].top] == ref[t - 1].topk(2).indices.tolist()


def test_nan_in_one_row_fails_only_that_request(tiny_family):
    poison = tiny_family.tokenizer.encode("salt")[0]
    emb = tiny_family.models["helpful"].module.get_input_embeddings()

    def hook(module, args, output):
        # The poisoned tokens' embeddings (a forward holds every row's tokens in one row).
        output[args[0] == poison] = float("nan")
        return output

    handle = emb.register_forward_hook(hook)

    async def go():
        engine = await started(tiny_family)
        try:
            good = asyncio.create_task(
                collect(
                    engine,
                    request(
                        tiny_family,
                        "good",
                        PROMPTS[0],
                        {"helpful": 1},
                        max_tokens=6,
                        ignore_eos=True,
                    ),
                )
            )
            bad = asyncio.create_task(
                collect(
                    engine,
                    request(
                        tiny_family,
                        "bad",
                        "salt salt",
                        {"helpful": 1},
                        max_tokens=6,
                        ignore_eos=True,
                    ),
                )
            )
            return await good, await bad
        finally:
            await engine.shutdown()

    try:
        good, bad = run(go())
    finally:
        handle.remove()
    assert bad[0]["finish"] == "error" and "finite" in bad[0]["error"]
    assert good[0]["finish"] == "length" and len(good[0]["tokens"]) == 6


def test_min_tokens_and_stop_token_ids(tiny_family):
    async def go():
        engine = await started(tiny_family)
        try:
            free = (
                await collect(
                    engine, request(tiny_family, "a", PROMPTS[0], max_tokens=8, ignore_eos=True)
                )
            )[0]
            stop_tok = free["tokens"][2]
            stopped = (
                await collect(
                    engine,
                    request(
                        tiny_family,
                        "b",
                        PROMPTS[0],
                        max_tokens=8,
                        ignore_eos=True,
                        stop_token_ids=[stop_tok],
                    ),
                )
            )[0]
            held = (
                await collect(
                    engine,
                    request(
                        tiny_family,
                        "c",
                        PROMPTS[0],
                        max_tokens=8,
                        ignore_eos=True,
                        stop_token_ids=[stop_tok],
                        min_tokens=8,
                    ),
                )
            )[0]
            return free, stop_tok, stopped, held
        finally:
            await engine.shutdown()

    free, stop_tok, stopped, held = run(go())
    first = free["tokens"].index(stop_tok)
    assert stopped["tokens"] == free["tokens"][: first + 1]
    assert stopped["finish"] == "stop"
    assert len(held["tokens"]) == 8 and stop_tok not in held["tokens"]


def test_queue_full_is_an_immediate_typed_rejection(tiny_family):
    async def go():
        # not started: nothing drains; 2 waiting fill both batch slots, so no slot is free
        engine = Engine(tiny_family, EngineConfig(max_waiting=2, max_batch_size=2))
        engine.start = lambda: None
        engine.submit(request(tiny_family, "1", "a"))
        engine.submit(request(tiny_family, "2", "a"))
        with pytest.raises(QueueFullError):
            engine.submit(request(tiny_family, "3", "a"))

    run(go())


def test_over_long_request_is_a_validation_error_naming_the_limit(tiny_family):
    async def go():
        engine = Engine(tiny_family)
        with pytest.raises(RequestValidationError, match="maximum context length is 512"):
            engine.submit(request(tiny_family, "r", "a", max_tokens=600))

    run(go())


def test_vocabulary_mismatch_is_refused_at_load(tmp_path):
    from demo.random_family import build_random_family, sample_text, train_tokenizer

    path = build_random_family(tmp_path)
    other = train_tokenizer(sample_text(seed=99)[:50], vocab_size=300)
    other.save_pretrained(tmp_path / "harmless")
    with pytest.raises(FamilyError, match="'large-base' and 'harmless'"):
        load_family(path)


def test_bad_family_yaml_names_the_field(tmp_path):
    (tmp_path / "f.yaml").write_text(
        "name: x\nmodels: {a: {path: a}, b: {path: b}}\nbase: a\nreference: b\nexperts: [c]\n"
    )
    with pytest.raises(FamilyError, match="experts"):
        load_family(tmp_path / "f.yaml")


def test_queue_bounds_do_not_leak_after_many_requests(tiny_family):
    async def go():
        engine = await started(tiny_family, max_batch_size=4)
        try:
            await asyncio.gather(
                *[
                    collect(
                        engine,
                        request(
                            tiny_family,
                            f"r{i}",
                            PROMPTS[i % 4],
                            {"helpful": (i % 3) / 2},
                            max_tokens=3,
                        ),
                    )
                    for i in range(12)
                ]
            )
            await asyncio.sleep(0.05)
            return engine.num_running, engine.num_waiting, engine.runners
        finally:
            await engine.shutdown()

    running, waiting, runners = run(go())
    assert (running, waiting) == (0, 0)
    assert all(not r.active and r.num_tokens() == 0 and r.nbytes() == 0 for r in runners.values())


def test_bfloat16_family_runs_the_same_code_path(tiny_family_path):
    family = load_family(tiny_family_path, dtype="bfloat16")
    assert all(m.dtype == torch.bfloat16 for m in family.models.values())

    async def go():
        engine = await started(family)
        try:
            await engine.warmup()
            return await collect(
                engine,
                request(
                    family,
                    "r",
                    PROMPTS[0],
                    {"helpful": 1.0},
                    max_tokens=5,
                    logprobs=1,
                    ignore_eos=True,
                ),
            )
        finally:
            await engine.shutdown()

    out = run(go())[0]
    assert len(out["tokens"]) == 5
    # The combination itself is float32 whatever the models' dtype.
    assert all(lp.logprob <= 0.0 for lp in out["lps"])


def test_base_top_p_restricts_sampling_but_not_the_reported_logprobs(tiny_family):
    """A base nucleus of ~0 mass leaves only the base's top token: EFT then decodes exactly
    what the base alone decodes, while log-probs still describe the composed distribution."""

    async def go():
        engine = await started(tiny_family)
        try:
            base = await collect(
                engine,
                request(
                    tiny_family, "b", PROMPTS[1], model="large-base", max_tokens=6, ignore_eos=True
                ),
            )
            filtered = await collect(
                engine,
                request(
                    tiny_family,
                    "f",
                    PROMPTS[1],
                    {"helpful": 2.0, "base_top_p": 1e-6},
                    max_tokens=6,
                    logprobs=1,
                    ignore_eos=True,
                    temperature=1.0,
                    seed=3,
                ),
            )
            plaus = await collect(
                engine,
                request(
                    tiny_family,
                    "p",
                    PROMPTS[1],
                    {"helpful": 2.0, "plausibility": 0.999},
                    max_tokens=6,
                    ignore_eos=True,
                    temperature=1.0,
                    seed=3,
                ),
            )
            return base[0], filtered[0], plaus[0]
        finally:
            await engine.shutdown()

    base, filtered, plaus = run(go())
    assert filtered["tokens"] == base["tokens"]
    prompt = tiny_family.tokenizer.encode(PROMPTS[1])
    comp = make_composition(tiny_family, None, {"helpful": 2.0})
    ref = reference_logprobs(tiny_family, comp.coeffs, prompt + filtered["tokens"])
    for t, lp in enumerate(filtered["lps"]):
        assert lp.logprob == pytest.approx(float(ref[len(prompt) - 1 + t, lp.token_id]), abs=1e-4)
    # alpha ~1 keeps only the top token of the base or of the expert at each step.
    v = tiny_family.vocab_size
    ids = prompt + plaus["tokens"]
    with torch.inference_mode():
        tops = {
            name: tiny_family.models[name].module(torch.tensor([ids])).logits[0, :, :v].argmax(-1)
            for name in ("large-base", "helpful")
        }
    for t, tok in enumerate(plaus["tokens"]):
        pos = len(prompt) - 1 + t
        assert tok in (int(tops["large-base"][pos]), int(tops["helpful"][pos]))


# ----------------------------------------------------------------- failures and corners


def poison_hook(family, model: str, poison: int, decode_only: bool = False):
    """Make `model`'s forward raise whenever its input holds `poison` (a stand-in for an OOM
    or a bad kernel on one batch)."""

    def hook(module, args):
        ids = args[0]
        if (ids == poison).any() and (not decode_only or ids.shape[1] == 1):
            raise RuntimeError("injected fault")

    return family.models[model].module.get_input_embeddings().register_forward_pre_hook(hook)


def test_a_failing_prefill_fails_its_request_and_the_engine_serves_on(tiny_family):
    poison = tiny_family.tokenizer.encode("copper")[0]

    async def go():
        engine = await started(tiny_family)
        try:
            good = asyncio.create_task(
                collect(
                    engine,
                    request(
                        tiny_family,
                        "good",
                        PROMPTS[0],
                        {"helpful": 1},
                        max_tokens=8,
                        ignore_eos=True,
                    ),
                )
            )
            while not engine.scheduler.running:
                await asyncio.sleep(0.005)
            bad = await collect(
                engine,
                request(tiny_family, "bad", "copper salt", {"helpful": 1}, max_tokens=4, n=2),
            )
            after = await collect(
                engine,
                request(
                    tiny_family, "after", PROMPTS[3], {"helpful": 1}, max_tokens=3, ignore_eos=True
                ),
            )
            return await good, bad, after, engine.runners
        finally:
            await engine.shutdown()

    handle = poison_hook(tiny_family, "helpful", poison)
    try:
        good, bad, after, runners = asyncio.run(asyncio.wait_for(go(), 60))
    finally:
        handle.remove()
    assert [bad[i]["finish"] for i in (0, 1)] == ["error", "error"]
    assert "injected fault" in bad[0]["error"]
    assert good[0]["finish"] == "length" and len(good[0]["tokens"]) == 8
    assert after[0]["finish"] == "length" and len(after[0]["tokens"]) == 3
    assert all(not r.active for r in runners.values())


async def doomed_then_later(family, mode: str, **later):
    """On a fresh engine (`speculative=mode`): greedy "doomed" (helpful 1, 6 tokens), then
    "later" on the small base alone; both results and the rows still running at the end."""
    engine = await started(family, speculative=mode)
    try:
        doomed = await collect(
            engine,
            request(family, "doomed", PROMPTS[1], {"helpful": 1}, max_tokens=6, ignore_eos=True),
        )
        after = await collect(
            engine, request(family, "later", PROMPTS[0], model="small-base", max_tokens=3, **later)
        )
        return doomed, after, engine.num_running
    finally:
        await engine.shutdown()


def test_a_failing_decode_step_fails_the_rows_it_touched_only(tiny_family):
    # The token the base model decodes second for this prompt poisons the decode forward
    # (speculation off: a speculative step would verify that token in a multi-token forward).
    poison = asyncio.run(doomed_then_later(tiny_family, "off"))[0][0]["tokens"][1]
    handle = poison_hook(tiny_family, "large-base", poison, decode_only=True)
    try:
        doomed, later, _ = asyncio.run(asyncio.wait_for(
            doomed_then_later(tiny_family, "off", ignore_eos=True), 60))  # fmt: skip
    finally:
        handle.remove()
    assert doomed[0]["finish"] == "error" and "injected fault" in doomed[0]["error"]
    assert doomed[0]["tokens"] == [doomed[0]["tokens"][0], poison]
    assert later[0]["finish"] == "length"


def test_a_failing_speculative_step_fails_its_rows_and_the_engine_serves_on(tiny_family):
    # The large base's verify forward raises on the token it verifies second; a request that
    # does not use the large base (small-base alone) is served afterwards.
    poison = asyncio.run(doomed_then_later(tiny_family, "off"))[0][0]["tokens"][1]
    assert poison not in tiny_family.tokenizer.encode(PROMPTS[1])  # the prefill is unharmed
    handle = poison_hook(tiny_family, "large-base", poison)
    try:
        doomed, later, running = asyncio.run(
            asyncio.wait_for(doomed_then_later(tiny_family, "3"), 60))  # fmt: skip
    finally:
        handle.remove()
    assert doomed[0]["finish"] == "error" and "injected fault" in doomed[0]["error"]
    assert later[0]["finish"] in ("length", "stop") and running == 0


def alone(family, prompt: str, knobs=None, **params) -> dict:
    """One request on a fresh engine: its first sibling's merged events."""

    async def go():
        engine = await started(family)
        try:
            return (await collect(engine, request(family, "r", prompt, knobs, **params)))[0]
        finally:
            await engine.shutdown()

    return asyncio.run(go())


def test_held_back_text_is_flushed_when_a_stop_token_ends_the_sequence(tiny_family):
    def go(**params):
        return alone(tiny_family, PROMPTS[1], {"helpful": 1}, ignore_eos=True, **params)

    plain = go(max_tokens=4)
    first, second = plain["tokens"][0], plain["tokens"][1]
    first_text = tiny_family.tokenizer.decode([first])
    # The first token's text could begin the stop string, so it is held back; the second
    # token is a stop id: the held-back text must come out (vLLM does the same).
    out = go(max_tokens=4, stop=[first_text + "\x01zz"], stop_token_ids=[second])
    assert out["tokens"] == [first, second] and out["finish"] == "stop"
    assert out["text"] == first_text


def test_stop_strings_are_not_checked_before_min_tokens(tiny_family):
    def go(**params):
        return alone(tiny_family, PROMPTS[2], {"helpful": 1}, ignore_eos=True, **params)

    plain = go(max_tokens=6)
    stop = tiny_family.tokenizer.decode(plain["tokens"][:1])
    assert stop.strip(), "the first token must have visible text for this test"
    early = go(max_tokens=6, stop=[stop])
    assert early["finish"] == "stop" and len(early["tokens"]) == 1
    late = go(max_tokens=6, stop=[stop], min_tokens=3)
    assert len(late["tokens"]) >= 3 and late["text"].startswith(stop)


def test_a_base_nucleus_of_one_banned_token_still_samples_a_real_token(tiny_family):
    """base_top_p ~0 keeps only the base's top token; making it a stop id under min_tokens
    used to leave nothing and emit token 0."""

    top = alone(tiny_family, "The capital of", model="large-base", max_tokens=1)["tokens"][0]
    out = alone(tiny_family, "The capital of", {"helpful": 1, "base_top_p": 1e-6},
                max_tokens=3, logprobs=1, stop_token_ids=[top], min_tokens=1)  # fmt: skip
    first = out["tokens"][0]
    assert first != top and first != tiny_family.tokenizer.pad_token_id
    assert out["lps"][0].logprob > -1e3  # a token the composition gives real mass to


@torch.inference_mode()
def model_logprobs(family, name, ids):
    logits = family.models[name].module(torch.tensor([ids])).logits[0, :, : family.vocab_size]
    return torch.log_softmax(logits.float(), -1).clamp_min(-1e4)


def test_trace_gives_each_models_logprob_and_argmax_of_every_token(tiny_family):
    knobs = {"helpful": 0.7, "harmless": 0.3}

    async def go():
        engine = await started(tiny_family)
        try:
            gen = await collect_traces(
                engine,
                request(
                    tiny_family,
                    "g",
                    PROMPTS[1],
                    knobs,
                    max_tokens=5,
                    ignore_eos=True,
                    trace=True,
                    temperature=1.0,
                    seed=4,
                ),
            )
            echo = await collect_traces(
                engine,
                request(
                    tiny_family, "e", PROMPTS[0], knobs, max_tokens=0, prompt_logprobs=0, trace=True
                ),
            )
            return gen, echo
        finally:
            await engine.shutdown()

    async def collect_traces(engine, req):
        tokens, traces, prompt = [], [], None
        async for ev in engine.submit(req):
            tokens += ev.token_ids
            traces += ev.trace or []
            prompt = ev.prompt_trace or prompt
        return tokens, traces, prompt

    (tokens, traces, _), (_, _, prompt_trace) = run(go())
    comp = make_composition(tiny_family, None, knobs)
    ids = tiny_family.tokenizer.encode(PROMPTS[1])
    seq = ids + tokens
    assert [t.token_id for t in traces] == tokens
    ref = reference_logprobs(tiny_family, comp.coeffs, seq)
    for name in comp.coeffs:
        lp = model_logprobs(tiny_family, name, seq)
        for j, tr in enumerate(traces):
            pos = len(ids) - 1 + j
            assert abs(tr.models[name] - lp[pos, tokens[j]].item()) < 1e-4
            assert tr.argmax[name] == int(lp[pos].argmax())
            assert abs(tr.logprob - ref[pos, tokens[j]].item()) < 1e-4
    # Echo scoring: every prompt token after the first is traced the same way.
    pids = tiny_family.tokenizer.encode(PROMPTS[0])
    assert prompt_trace[0] is None and len(prompt_trace) == len(pids)
    lp = model_logprobs(tiny_family, "helpful", pids)
    for j, tr in enumerate(prompt_trace[1:]):
        assert tr.token_id == pids[j + 1]
        assert abs(tr.models["helpful"] - lp[j, pids[j + 1]].item()) < 1e-4


def tiny_runner(blocks: int = 64, block_size: int = 16):
    """A real runner (2-layer Llama) with a pool of `blocks` blocks, for scheduler tests."""
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoModelForCausalLM

    from decoding.family import LoadedModel
    from decoding.runner import ModelRunner

    config = AutoConfig.for_model(
        "llama", vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    cpu = torch.device("cpu")
    loaded = LoadedModel("m", model, SimpleNamespace(pad_token_id=0), cpu, cpu, torch.float32,
                         0, 4096, "plain")  # fmt: skip
    runner = ModelRunner(loaded)
    runner.allocate_pool(blocks, block_size, prefix_caching=True)
    return runner


def waiting_request(n_tokens: int, rid: str = "r", **params):
    from decoding.request import Composition, GenerationRequest
    from decoding.sequence import RequestState

    req = GenerationRequest(rid, {"m": list(range(n_tokens))}, Composition({"m": 1.0}),
                            SamplingParams(**params))  # fmt: skip
    return RequestState(req, None, None, ["m"])


def test_joining_prompts_get_a_prefill_share_per_decoding_row():
    """While 20 rows decode, a 100-token prompt is prefilled 20 tokens a step (prefill_share 1),
    not all at once; with no row decoding it takes the whole budget."""
    from types import SimpleNamespace

    from decoding.scheduler import Scheduler

    runners = {"m": tiny_runner()}
    shared = EngineConfig(max_batch_size=32, max_num_batched_tokens=512, prefill_share=1.0)
    sched = Scheduler(shared, runners)
    sched.running = [SimpleNamespace(request=object(), slots={}) for _ in range(20)]
    sched.waiting.append(waiting_request(100))
    plan, admitted = sched.schedule()
    assert len(admitted) == 1 and plan.prefill[0].spans == {"m": (0, 20)}
    alone = Scheduler(shared, runners)
    alone.waiting.append(waiting_request(100))
    assert alone.schedule()[0].prefill[0].spans == {"m": (0, 100)}
    unlimited = Scheduler(EngineConfig(max_num_batched_tokens=512, prefill_share=0), runners)
    unlimited.running = list(sched.running)
    unlimited.waiting.append(waiting_request(100))
    assert unlimited.schedule()[0].prefill[0].spans == {"m": (0, 100)}


def test_a_pad_token_outside_the_embedding_is_never_fed(tiny_family_path, tmp_path):
    """A tokenizer that declares a pad token past its model's embedding (as Qwen2 families can)
    is served: the engine feeds no padding (one flattened row per step), and the id is outside
    the shared vocabulary, so it is never sampled either."""
    import shutil

    from transformers import AutoTokenizer

    family_dir = tmp_path / "family"
    shutil.copytree(tiny_family_path.parent, family_dir)
    for name in ("large-base", "small-base", "helpful", "harmless"):
        tok = AutoTokenizer.from_pretrained(family_dir / name)
        tok.add_special_tokens({"pad_token": "<|pad-outside|>"})
        tok.save_pretrained(family_dir / name)
    family = load_family(family_dir / "family.yaml")
    pad = family.models["small-base"].tokenizer.pad_token_id
    width = family.models["small-base"].module.get_input_embeddings().weight.shape[0]
    assert pad >= width and family.vocab_size <= width
    out = alone(family, PROMPTS[1], {"helpful": 1.0}, max_tokens=6, ignore_eos=True, n=2,
                temperature=1.0, seed=3)  # fmt: skip
    assert out["finish"] == "length" and len(out["tokens"]) == 6
    assert max(out["tokens"]) < family.vocab_size
