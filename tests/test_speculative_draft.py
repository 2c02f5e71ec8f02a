"""A family's dedicated `draft` model: it drafts for speculating rows from outside their
composition, the greedy output stays exactly the plain output, and its slots are freed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
import yaml

from decoding.composition import make_composition
from decoding.engine import Engine, EngineConfig
from decoding.family import FamilyConfig, load_family
from decoding.request import GenerationRequest, SamplingParams

QUESTIONS = ["what is the capital", "who founded the river city", "north"]


def with_drafter(tiny_family_path, out_dir: Path, weights: str, **spec):
    """The tiny family plus an entry `drafter`, the family's draft model, on the weights of the
    entry `weights` (shared, with KV slots of its own)."""
    root = Path(tiny_family_path).parent
    cfg = yaml.safe_load(Path(tiny_family_path).read_text())
    cfg["models"] = {name: {"path": str(root / name)} for name in cfg["models"]}
    cfg["models"]["drafter"] = {"path": str(root / weights), **spec}
    cfg["draft"] = "drafter"
    path = out_dir / "family.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return load_family(path)


@pytest.fixture(scope="module")
def draft_family(tiny_family_path, tmp_path_factory):
    """Drafting with the small base's weights, rendering chats with the plain template so its
    prompts differ in length from the other models'."""
    out = tmp_path_factory.mktemp("draft-family")
    return with_drafter(tiny_family_path, out, "small-base", chat_template="plain")


def chat_request(family, rid: str, question: str, knobs: dict, **params) -> GenerationRequest:
    prompts = family.render_chat([{"role": "user", "content": question}])
    return GenerationRequest(
        rid, prompts, make_composition(family, None, knobs), SamplingParams(**params)
    )


def run(family, mode: str, knob_sets: list[dict]):
    """Every knob setting on every question at once (one with n=2), greedy; per request its
    tokens and log-probs, every step's statistics, and the runners' slots in use at the end."""
    steps = []

    async def go():
        engine = Engine(family, EngineConfig(speculative=mode), on_step=steps.append)
        engine.start()

        async def one(rid, question, knobs, n, delay):
            await asyncio.sleep(delay)  # later requests join while others decode
            out: dict[int, tuple[list, list]] = {}
            req = chat_request(family, rid, question, knobs, max_tokens=12, temperature=0,
                               logprobs=0, ignore_eos=True, n=n)  # fmt: skip
            async for ev in engine.submit(req):
                assert ev.finish_reason != "error", ev.error
                toks, lps = out.setdefault(ev.index, ([], []))
                toks += ev.token_ids
                lps += [lp.logprob for lp in ev.logprobs or []]
            return out

        try:
            jobs = [
                one(f"r{k}-{i}", q, knobs, 2 if i == 0 else 1, 0.02 * i)
                for k, knobs in enumerate(knob_sets)
                for i, q in enumerate(QUESTIONS)
            ]
            outs = await asyncio.gather(*jobs)
            in_use = {name: set(r.active) for name, r in engine.runners.items()}
            return outs, in_use
        finally:
            await engine.shutdown()

    outs, in_use = asyncio.run(go())
    return outs, steps, in_use


KNOBS = [{"helpful": 1.0}, {"helpful": 0.7, "harmless": 0.3}, {"helpful": 0.0}]


def test_greedy_output_is_identical_when_a_draft_model_drafts(draft_family):
    plain, plain_steps, _ = run(draft_family, "off", KNOBS)
    spec, spec_steps, in_use = run(draft_family, "3", KNOBS)
    # Speculation happened, with the draft model doing the drafting (the base-only rows too:
    # they have no expert, so only a draft model can draft for them).
    drafted = [s for s in spec_steps if s.spec_draft_tokens]
    # (The drafter shares small-base's weights, so it runs in small-base's forwards; its own
    # KV slots show that it holds the rows' tokens.)
    assert drafted and all(s.kv_cache_tokens["drafter"] > 0 for s in drafted)
    assert sum(s.spec_accepted_tokens for s in drafted) < sum(s.spec_draft_tokens for s in drafted)
    # With speculation off the draft model is never prefilled nor run.
    assert not any(s.kv_cache_tokens.get("drafter") for s in plain_steps)
    for a, b in zip(plain, spec):
        assert set(a) == set(b)
        for index in a:
            assert a[index][0] == b[index][0]
            torch.testing.assert_close(torch.tensor(a[index][1]), torch.tensor(b[index][1]),
                                       atol=1e-4, rtol=0)  # fmt: skip
    # Every slot is back, the draft model's included.
    assert all(not used for used in in_use.values()), in_use


def test_a_draft_model_sees_every_token_of_its_row(tiny_family_path, tmp_path):
    """A draft model with the base's own weights, on rows that use the base alone: the target is
    its own distribution, so every greedy draft is accepted, but only if its KV holds exactly
    the row's tokens: the prompt, the tokens of steps that did not speculate (a row's first
    steps run beside joining prompts), and after a fully accepted block the last draft, which
    the draft model proposed but never forwarded."""
    family = with_drafter(tiny_family_path, tmp_path, "large-base")
    outs, steps, in_use = run(family, "3", [{"helpful": 0.0}])
    drafted = sum(s.spec_draft_tokens for s in steps)
    assert drafted > 20 and sum(s.spec_accepted_tokens for s in steps) == drafted
    assert all(len(toks) == 12 for out in outs for toks, _ in out.values())
    assert all(not used for used in in_use.values()), in_use


def test_draft_must_be_an_entry_other_than_the_base():
    base = {"name": "f", "models": {"a": {"path": "a"}, "b": {"path": "b"}}, "base": "a"}
    assert FamilyConfig.model_validate({**base, "draft": "b"}).draft == "b"
    with pytest.raises(ValueError, match="draft: 'c' is not one of models"):
        FamilyConfig.model_validate({**base, "draft": "c"})
    with pytest.raises(ValueError, match="the base cannot draft"):
        FamilyConfig.model_validate({**base, "draft": "a"})


def test_a_draft_model_family_serves_through_http(tiny_family_path, tmp_path):
    """A real `eft-serve` with a draft model and the official client: a greedy chat for the base
    alone speculates (only a draft model can draft for it), reports what it drafted, and says
    exactly what the same request says with speculation opted out."""
    import openai

    from server.process import ServerProcess

    with_drafter(tiny_family_path, tmp_path, "small-base", chat_template="plain")
    name = yaml.safe_load((tmp_path / "family.yaml").read_text())["name"]
    with ServerProcess(tmp_path / "family.yaml", "--speculative", "3", "--threads", "1",
                       log_path=tmp_path / "server.log", ready_timeout=90) as srv:  # fmt: skip
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
        answers = []
        for spec in (True, False):
            r = client.chat.completions.create(
                model=f"{name}/large-base", max_tokens=12, temperature=0,
                messages=[{"role": "user", "content": QUESTIONS[1]}],
                extra_body={"ignore_eos": True, "eft": {"speculative": spec}},
            )  # fmt: skip
            answers.append((r.choices[0].message.content, (r.usage.model_extra or {})))
    (spec_text, spec_usage), (plain_text, plain_usage) = answers
    assert spec_text == plain_text and spec_usage["eft_speculative"]["drafted_tokens"] > 0
    assert "eft_speculative" not in plain_usage
