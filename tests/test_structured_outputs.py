"""Structured outputs: llguidance grammars on the composed distribution.

Unit tests drive the matcher and its bitmask over the demo family's real tokenizer; the
server tests start `eft-serve` on the demo family (speculation forced on, `--speculative 4`,
so a request speculates unless it sends `"eft": {"speculative": false}`) and use the
official `openai` SDK as a user would.
"""

from __future__ import annotations

import asyncio
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
import torch
from transformers import AutoTokenizer

from decoding.composition import make_composition
from decoding.detokenizer import IncrementalDetokenizer
from decoding.engine import Engine, EngineConfig
from decoding.family import load_family
from decoding.grammar import BlockMasks, GrammarMask, Grammars, unpack
from decoding.request import Composition, GenerationRequest, RequestValidationError, SamplingParams
from decoding.sequence import RequestState, Sequence
from server.process import ServerProcess

FAMILY = Path(__file__).resolve().parents[1] / "demo" / "family" / "family.yaml"
PAD = 7  # the grammars' vocabulary is wider than the tokenizer, as a padded embedding is

pytestmark = pytest.mark.skipif(not FAMILY.is_file(), reason="demo family not built")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["city", "river", "king"]},
        "place": {
            "type": "object",
            "properties": {"region": {"enum": ["north", "south"]}, "old": {"type": "boolean"}},
            "required": ["region", "old"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "kind", "place", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(FAMILY.parent / "large-base")


@pytest.fixture(scope="module")
def grammars(tok):
    return Grammars(tok, len(tok) + PAD, frozenset({tok.eos_token_id}))


def lark(text: str) -> str:
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_lark(text)


def regex(text: str) -> str:
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_regex(text)


def allowed(mask: GrammarMask, row: int = 0) -> set[int]:
    return set((~mask.disallowed()[row]).nonzero().flatten().tolist())


# ------------------------------------------------------------------ the matcher and its mask


def test_mask_allows_exactly_the_tokens_that_start_an_admitted_text(tok, grammars):
    words = ["river", "king"]
    mask = GrammarMask(grammars, [grammars.matcher(lark('start: "river" | "king"')), None],
                       torch.device("cpu"))
    # Brute force over the vocabulary: a token fits when its text starts one of the words.
    pieces = {t: tok.decode([t]) for t in range(len(tok))}
    expect = {t for t, s in pieces.items() if s and any(w.startswith(s) for w in words)}
    assert allowed(mask, 0) == expect and expect
    assert allowed(mask, 1) == set(range(len(tok) + PAD))  # the unconstrained row: everything


def test_unpack_reads_llguidance_bit_order():
    bits = torch.zeros(2, 2, dtype=torch.int32)
    bits[0, 0] = 1 << 3
    bits[0, 1] = -(2**31)  # bit 31 of word 1: token 63
    bits[1, 1] = 1
    out = ~unpack(bits, 40)  # cut to 40 tokens: token 63 is past the vocabulary
    assert out.shape == (2, 40)
    assert out[0].nonzero().flatten().tolist() == [3]
    assert out[1].nonzero().flatten().tolist() == [32]


def test_compiled_grammars_are_cached_by_text_and_rows_get_their_own_matcher(tok, grammars):
    text = regex("[a-z]+")
    assert grammars.compile(text) is grammars.compile(text)
    assert grammars.compile(regex("[0-9]+")) is not grammars.compile(text)
    a, b = grammars.matcher(text), grammars.matcher(text)
    assert a.consume_token(tok.convert_tokens_to_ids("a"))
    # b is still at the start: a digit-free word may begin; a's state moved on alone.
    assert not b.is_error() and b.consume_token(tok.convert_tokens_to_ids("b"))


@pytest.mark.parametrize("text,needle", [
    (lambda: regex("a(b"), "unclosed group"),
    (lambda: lark("start: missing_rule"), "missing_rule"),
])
def test_bad_grammar_is_a_validation_error_naming_the_problem(grammars, text, needle):
    with pytest.raises(RequestValidationError, match=needle):
        grammars.compile(text())


def test_a_block_walks_the_drafts_and_rolls_the_matcher_back(tok, grammars):
    text = regex("(ab)+c")
    a, b, c = (tok.convert_tokens_to_ids(x) for x in "abc")
    row = grammars.matcher(text)
    mask = GrammarMask(grammars, [row], torch.device("cpu"))
    before = allowed(mask)
    blk = BlockMasks(mask, 3, 1)
    ks = [3]
    at0 = blk.at(0, ks, None)
    at1 = blk.at(1, ks, [a])
    at2 = blk.at(2, ks, [b])
    full = blk.finish(ks, [[a, b, a]])
    assert ks == [3] and full.shape == (4, 1, len(tok) + PAD)
    # Each position's mask is the one of a matcher that consumed the drafts before it.
    ref = grammars.matcher(text)
    for j, tokens in enumerate([[], [a], [a, b], [a, b, a]]):
        probe = GrammarMask(grammars, [ref.deep_copy()], torch.device("cpu"))
        for t in tokens:
            assert probe.matchers[0].consume_token(t)
        assert torch.equal(full[j, 0], probe.disallowed()[0]), j
    assert torch.equal(at0[0], full[0, 0]) and torch.equal(at1[0], full[1, 0])
    assert torch.equal(at2[0], full[2, 0])
    assert allowed(mask) == before  # rolled back to where the block started
    assert (~full[1, 0]).nonzero().flatten().tolist() == [b]
    assert c not in allowed(mask)


def test_a_block_stops_drafting_where_the_grammar_completes(tok, grammars):
    yes = tok.encode("yes", add_special_tokens=False)
    row = grammars.matcher(lark('start: "yes"'))
    mask = GrammarMask(grammars, [row], torch.device("cpu"))
    blk = BlockMasks(mask, 4, 1)
    ks = [4]
    blk.at(0, ks, None)
    for j, t in enumerate(yes, start=1):
        blk.at(j, ks, [t])
    assert ks == [len(yes)]  # nothing is drafted after the grammar's last token
    blk.finish(ks, [yes])
    assert not row.is_stopped() and not row.is_error()


def _row(tok, grammars, text: str) -> Sequence:
    req = GenerationRequest("r", {"m": [1]}, Composition({"m": 1.0}),
                            SamplingParams(max_tokens=8, grammar=text))
    state = RequestState(req, None, None, ["m"])
    seq = Sequence(state, 0, req.params, IncrementalDetokenizer(tok, [], True), None, {"m": 0})
    seq.matcher = grammars.matcher(text)
    return seq


def test_a_row_ends_with_stop_when_its_grammar_is_complete(tok, grammars):
    seq = _row(tok, grammars, lark('start: "no"'))
    ids = tok.encode("no", add_special_tokens=False)
    outs = [seq.append(t, frozenset({tok.eos_token_id})) for t in ids]
    assert [o.finish_reason for o in outs] == [None] * (len(ids) - 1) + ["stop"]
    assert "".join(o.text for o in outs) == "no"


def test_a_token_the_grammar_cannot_take_ends_the_row_with_an_error_saying_so(tok, grammars):
    seq = _row(tok, grammars, lark('start: "no"'))
    out = seq.append(tok.convert_tokens_to_ids("x"), frozenset({tok.eos_token_id}))
    assert out.finish_reason == "error" and "admits no continuation" in out.error
    assert seq.finished and seq.output == []


# ------------------------------------------------------------------ over HTTP, with the SDK


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(FAMILY, "--speculative", "4", "--max-batch-size", "16", "--threads", "1",
                       log_path=tmp_path_factory.mktemp("so") / "server.log",
                       ready_timeout=120) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)


KNOBS = [{}, {"helpful": 0.5, "harmless": 0.5}, {"helpful": 2.0, "plausibility": 0.1},
         {"harmless": 1.0, "base_top_p": 0.9}, {"helpful": 1.0}]
PROMPTS = ["Describe the river city.", "Who was the old king?", "Name a place in the north."]


def _one_json(client, i: int) -> tuple[dict, str | None, dict | None]:
    """Request i of a grid over knobs, temperature, chat/completions, streaming, speculation."""
    fmt = {"type": "json_schema",
           "json_schema": {"name": "place", "schema": SCHEMA, "strict": True}}
    spec = i % 2 == 0
    extra = {"eft": {**KNOBS[i % len(KNOBS)], "speculative": spec}}
    temperature = [0.0, 0.8, 1.0][i % 3]
    stream = (i // 2) % 2 == 1
    chat = (i // 4) % 2 == 0
    common = dict(model="demo", max_tokens=120, temperature=temperature, seed=None,
                  extra_body=extra)
    case = {"i": i, "spec": spec, "stream": stream, "chat": chat, **extra}
    usage = None
    if chat:
        messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        if stream:
            parts, finish = [], None
            for ch in client.chat.completions.create(messages=messages, response_format=fmt,
                                                     stream=True, **common):
                for c in ch.choices:
                    parts.append(c.delta.content or "")
                    finish = c.finish_reason or finish
            return case, "".join(parts), finish
        r = client.chat.completions.create(messages=messages, response_format=fmt, **common)
        text, finish, usage = r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    else:
        prompt = PROMPTS[i % len(PROMPTS)]
        body = {**common, "extra_body": {**extra, "response_format": fmt}}
        if stream:
            parts, finish = [], None
            for ch in client.completions.create(prompt=prompt, stream=True, **body):
                for c in ch.choices:
                    parts.append(c.text)
                    finish = c.finish_reason or finish
            return case, "".join(parts), finish
        r = client.completions.create(prompt=prompt, **body)
        text, finish, usage = r.choices[0].text, r.choices[0].finish_reason, r.usage
    case["drafted"] = (usage.model_extra or {}).get("eft_speculative") if usage else None
    return case, text, finish


def test_json_schema_outputs_validate_over_knobs_streams_and_speculation(client):
    # A step speculates only when all its rows may: the speculating half runs on its own.
    results = []
    for half in (0, 1):
        with ThreadPoolExecutor(8) as pool:
            results += pool.map(lambda i: _one_json(client, i), range(half, 50, 2))
    assert len(results) == 50
    for case, text, finish in results:
        assert finish == "stop", (case, text, finish)
        jsonschema.validate(json.loads(text), SCHEMA)
    # Speculation really ran for requests that allowed it, and never for the others.
    assert any(c.get("drafted") for c, _, _ in results if c["spec"])
    assert not any(c.get("drafted") for c, _, _ in results if not c["spec"])


def test_greedy_constrained_output_is_the_same_with_and_without_speculation(client):
    def run(prompt: str, spec: bool, knobs: dict) -> tuple[str, list[float]]:
        r = client.completions.create(
            model="demo", prompt=prompt, max_tokens=100, temperature=0, logprobs=2,
            extra_body={"eft": {**knobs, "speculative": spec},
                        "structured_outputs": {"json": SCHEMA}})
        return r.choices[0].text, r.choices[0].logprobs.token_logprobs

    for prompt, knobs in zip(PROMPTS, KNOBS[1:]):
        (a, lp_a), (b, lp_b) = run(prompt, True, knobs), run(prompt, False, knobs)
        assert a == b, (prompt, knobs)
        assert lp_a == pytest.approx(lp_b, abs=1e-3)
        jsonschema.validate(json.loads(a), SCHEMA)


def test_sdk_parse_with_a_pydantic_model(client):
    from typing import Literal

    from pydantic import BaseModel

    class Answer(BaseModel):
        kind: Literal["city", "river"]
        old: bool

    r = client.chat.completions.parse(
        model="demo", messages=[{"role": "user", "content": "Which is it?"}],
        response_format=Answer, max_tokens=60, temperature=0.7)
    parsed = r.choices[0].message.parsed
    assert r.choices[0].finish_reason == "stop" and isinstance(parsed, Answer)


def test_json_object_mode_returns_an_object(client):
    r = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Give me JSON."}], max_tokens=200,
        temperature=0.7, response_format={"type": "json_object"},
        extra_body={"eft": {"helpful": 1.0}})
    ch = r.choices[0]
    # A tiny model may not close an open object within max_tokens: that is "length" (as in
    # vLLM); what it did produce is still a prefix of one object.
    assert ch.finish_reason in ("stop", "length")
    if ch.finish_reason == "stop":
        assert isinstance(json.loads(ch.message.content), dict)
    else:
        assert ch.message.content.startswith("{")


def test_choice_returns_one_of_the_choices_for_every_sibling(client):
    choices = ["north", "south", 'the "old" river', "café"]
    r = client.completions.create(model="demo", prompt="Where?", max_tokens=20, n=6,
                                  temperature=1.0, seed=11,
                                  extra_body={"structured_outputs": {"choice": choices},
                                              "eft": {"helpful": 1.5}})
    assert len(r.choices) == 6
    for c in r.choices:
        assert c.text in choices and c.finish_reason == "stop"
    again = client.completions.create(model="demo", prompt="Where?", max_tokens=20, n=6,
                                      temperature=1.0, seed=11,
                                      extra_body={"structured_outputs": {"choice": choices},
                                                  "eft": {"helpful": 1.5}})
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeds hold


def test_regex_matches_streamed_with_stop_strings_min_tokens_and_logprobs(client):
    pattern = r"[A-Z][a-z]{2,6}-[0-9]{3}"
    chunks = list(client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "A code?"}], max_tokens=30,
        temperature=1.0, stream=True, logprobs=True, top_logprobs=3,
        extra_body={"structured_outputs": {"regex": pattern}, "min_tokens": 2,
                    "eft": {"harmless": 0.7}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert re.fullmatch(pattern, text), text
    # A stop string cuts the text; the grammar still held up to it.
    r = client.completions.create(model="demo", prompt="A code?", max_tokens=30, stop=["-"],
                                  extra_body={"structured_outputs": {"regex": pattern}})
    assert r.choices[0].finish_reason == "stop" and re.fullmatch(r"[A-Z][a-z]{2,6}",
                                                                 r.choices[0].text)


def test_logprobs_are_those_of_the_distribution_sampled(client):
    # Two choices: the first token's constrained distribution has only a few tokens, so the
    # reported top alternatives are all of them and their probabilities sum to one.
    r = client.completions.create(model="demo", prompt="Pick:", max_tokens=10, logprobs=5,
                                  temperature=1.0,
                                  extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    top = r.choices[0].logprobs.top_logprobs[0]
    assert len(top) < 5
    assert sum(2.718281828459045 ** v for v in top.values()) == pytest.approx(1.0, abs=1e-3)
    assert all("yes".startswith(t) or "no".startswith(t) for t in top)
    # The trace reports the same constrained distribution.
    r = client.completions.create(model="demo", prompt="Pick:", max_tokens=10, logprobs=1,
                                  extra_body={"structured_outputs": {"choice": ["yes", "no"]},
                                              "eft": {"trace": True, "helpful": 0.5}})
    c = r.choices[0]
    assert c.text in ("yes", "no")
    trace = [t["logprob"] for t in c.model_extra["trace"]]
    assert trace == pytest.approx(c.logprobs.token_logprobs, abs=1e-5)


def test_gbnf_grammar_is_followed(client):
    gbnf = 'root ::= "The " animal " is " size\nanimal ::= "cat" | "dog"\nsize ::= "big" | "small"'
    r = client.completions.create(model="demo", prompt="Say:", max_tokens=20, temperature=1.0,
                                  extra_body={"structured_outputs": {"grammar": gbnf}})
    assert re.fullmatch(r"The (cat|dog) is (big|small)", r.choices[0].text)
    assert r.choices[0].finish_reason == "stop"


def test_vllm_guided_fields_are_structured_outputs(server):
    r = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": "demo", "prompt": "Where?", "max_tokens": 10, "guided_choice": ["up", "down"]})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] in ("up", "down")
    r = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": "demo", "prompt": "x", "guided_regex": "a", "structured_outputs": {"regex": "b"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs"


def test_a_grammar_that_admits_only_eos_ends_with_stop(client):
    r = client.completions.create(model="demo", prompt="Nothing:", max_tokens=5,
                                  extra_body={"structured_outputs": {"regex": ""}})
    assert r.choices[0].text == "" and r.choices[0].finish_reason == "stop"


BAD = [
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format", "objectx"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}},
     "response_format", None),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs", "unclosed group"),
    ({"structured_outputs": {"grammar": "root ::= missing"}}, "structured_outputs", "missing"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", None),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs", "JSON"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
     "structured_outputs", "not both"),
]


@pytest.mark.parametrize("extra,param,needle", BAD, ids=[json.dumps(b[0])[:50] for b in BAD])
def test_bad_formats_are_400_naming_the_field(server, extra, param, needle):
    for path, body in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        r = httpx.post(f"{server.url}{path}", json={"model": "demo", "max_tokens": 4, **body,
                                                     **extra}, timeout=30)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] and err["param"].startswith(param), err
        if needle:
            assert needle in err["message"], err
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


def test_structured_bench_measures_both_sides_with_the_same_tokens():
    from loadtest.structured_bench import measure

    res = measure(load_family(str(FAMILY)), batch=4, max_tokens=6, rounds=1)
    assert res["tokens"] == {"plain": [4 * 6], "json_schema": [4 * 6]}
    assert res["plain_tok_s"][0] > 0 and res["json_schema_tok_s"][0] > 0
    assert res["structured_overhead"] == res["json_schema_tok_s"][0] / res["plain_tok_s"][0]


# ------------------------------------------------------------------ in the engine


def test_preempted_constrained_rows_resume_their_grammar_where_they_were():
    """16 constrained greedy requests (n=2 among them) in a KV pool a quarter of their tokens:
    rows are preempted and recomputed, and every output equals a large pool's (a matcher that
    lost its place would steer a resumed row elsewhere), each a prefix the grammar admits."""
    family = load_family(str(FAMILY))
    grammar = regex(r"([a-z]{1,8} ){4,}")  # does not end within 24 tokens
    unit = sum(r.block_bytes_per_token for r, _ in Engine(family, EngineConfig(
        kv_cache_memory=1 << 20)).groups)  # fmt: skip
    comp = make_composition(family, None, {"helpful": 1.0})
    reqs, total = [], 0
    for i in range(16):
        ids = family.tokenizer.encode("the river city " * (1 + i % 5), add_special_tokens=True)
        n = 2 if i % 5 == 0 else 1
        params = SamplingParams(max_tokens=24, temperature=0.0, n=n, grammar=grammar)
        reqs.append(GenerationRequest(f"p{i}", {m: ids for m in comp.coeffs}, comp, params))
        total += n * (len(ids) + 24)

    def run(memory: int) -> tuple[list[str], int]:
        steps = []
        engine = Engine(family, EngineConfig(kv_cache_memory=memory, speculative="off"),
                        on_step=steps.append)  # fmt: skip

        async def go():
            engine.start()
            texts = {}
            for req, stream in zip(reqs, engine.submit_all(reqs)):
                async for out in stream:
                    assert out.finish_reason != "error", out.error
                    key = (req.request_id, out.index)
                    texts[key] = texts.get(key, "") + out.text
            await engine.shutdown()
            return [texts[k] for k in sorted(texts)]

        return asyncio.run(go()), sum(s.preemptions for s in steps)

    free, _ = run(8 * total * unit)
    tight, preempted = run(total * unit // 4)
    assert preempted > 0
    assert tight == free
    assert all(re.fullmatch(r"([a-z]{1,8} )*[a-z]{0,8}", t) for t in tight), tight
