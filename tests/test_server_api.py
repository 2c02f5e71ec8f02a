"""The HTTP wire format, in process (httpx ASGITransport) against the real engine.

One engine for the module on the session's tiny random family; requests stay short
(a few tokens) because the machine running the suite is small.
"""

from __future__ import annotations

import json
import math

import pytest

from decoding.engine import EngineConfig
from server.app import ServerSettings
from server.tokens import TokenText

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
async def api(tiny_family, serve_app):
    async with serve_app(tiny_family, EngineConfig(max_batch_size=16, max_waiting=32),
                         ServerSettings()) as s:
        yield s


def sse(text: str) -> list[dict]:
    """The JSON payloads of an SSE body; asserts the OpenAI framing and the final [DONE]."""
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    blocks = text.split("\n\n")
    assert blocks[-1] == ""
    payloads = []
    for block in blocks[:-2]:
        assert block.startswith("data: "), block
        payloads.append(json.loads(block[len("data: "):]))
    return payloads


async def complete(api, **body) -> dict:
    body.setdefault("model", api.family.name)
    body.setdefault("max_tokens", 4)
    r = await api.client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def chat(api, **body) -> dict:
    body.setdefault("model", api.family.name)
    body.setdefault("max_tokens", 4)
    body.setdefault("messages", [{"role": "user", "content": "where is the river?"}])
    r = await api.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------------------ models


async def test_models_lists_family_first_then_each_model(api):
    r = await api.client.get("/v1/models")
    assert r.status_code == 200
    ids = [m["id"] for m in r.json()["data"]]
    assert ids == ["tiny", "tiny/large-base", "tiny/small-base", "tiny/helpful", "tiny/harmless"]
    first = r.json()["data"][0]
    assert first["object"] == "model" and first["eft"]["experts"] == ["helpful", "harmless"]
    r = await api.client.get("/v1/models/tiny/helpful")
    assert r.status_code == 200 and r.json()["id"] == "tiny/helpful"


# ------------------------------------------------------------------------------ completions


async def test_completion_shape_usage_and_knob_echo(api):
    out = await complete(api, prompt="the river city", eft={"helpfulness": 0.5, "harmless": 0.5})
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert out["model"] == "tiny"
    (choice,) = out["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length")
    assert isinstance(choice["text"], str) and choice["logprobs"] is None
    n_prompt = len(api.family.tokenizer.encode("the river city"))
    assert out["usage"]["prompt_tokens"] == n_prompt
    assert 1 <= out["usage"]["completion_tokens"] <= 4
    assert out["usage"]["total_tokens"] == n_prompt + out["usage"]["completion_tokens"]
    # the alias resolved, the knobs actually used echoed back
    assert out["eft"]["helpful"] == 0.5 and out["eft"]["harmless"] == 0.5


async def test_family_defaults_apply_when_no_expert_named(api):
    out = await complete(api, prompt="north", max_tokens=1)
    assert out["eft"] == {"helpful": 1.0, "harmless": 0.0}
    out = await complete(api, prompt="north", max_tokens=1, eft={"harmless": 1})
    assert out["eft"]["helpful"] == 0.0 and out["eft"]["harmless"] == 1.0


async def test_prompt_forms_and_n(api):
    tok = api.family.tokenizer
    ids_a, ids_b = tok.encode("the king"), tok.encode("a queen of salt")
    out = await complete(api, prompt=["the king", "a queen of salt"], n=2, max_tokens=2,
                         temperature=1.0, seed=1)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert out["usage"]["prompt_tokens"] == len(ids_a) + len(ids_b)
    out_ids = await complete(api, prompt=ids_a, max_tokens=2, temperature=0)
    out_str = await complete(api, prompt="the king", max_tokens=2, temperature=0)
    assert out_ids["choices"][0]["text"] == out_str["choices"][0]["text"]
    out = await complete(api, prompt=[ids_a, ids_b], max_tokens=1)
    assert len(out["choices"]) == 2
    assert out["usage"]["prompt_tokens"] == len(ids_a) + len(ids_b)


async def test_echo_prompt_logprobs_for_scoring(api):
    """lm-evaluation-harness: echo + logprobs + max_tokens 0 scores the prompt."""
    tok = api.family.tokenizer
    ids = tok.encode("the river was founded")
    out = await complete(api, prompt="the river was founded", echo=True, logprobs=2,
                         max_tokens=0)
    (c,) = out["choices"]
    assert c["text"] == "the river was founded"
    lp = c["logprobs"]
    assert len(lp["tokens"]) == len(ids) == len(lp["token_logprobs"]) == len(lp["text_offset"])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(x <= 0 for x in lp["token_logprobs"][1:])
    for tok_str, d, x in zip(lp["tokens"][1:], lp["top_logprobs"][1:],
                             lp["token_logprobs"][1:], strict=True):
        assert tok_str in d and d[tok_str] == x and 2 <= len(d) <= 3
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert out["usage"]["completion_tokens"] == 0
    assert out["usage"]["prompt_tokens"] == len(ids)


async def test_echo_with_generation_and_generated_logprobs(api):
    out = await complete(api, prompt="the king", echo=True, logprobs=1, max_tokens=3,
                         ignore_eos=True)
    (c,) = out["choices"]
    assert c["text"].startswith("the king")
    n_prompt = len(api.family.tokenizer.encode("the king"))
    assert len(c["logprobs"]["tokens"]) == n_prompt + 3
    gen = await complete(api, prompt="the king", logprobs=0, max_tokens=3, ignore_eos=True)
    lp = gen["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 3 and all(len(d) == 1 for d in lp["top_logprobs"])


async def test_knobs_change_the_distribution(api):
    prompt = "the river city was founded by the king"

    async def scores(model="tiny", **eft):
        body = {"model": model, "prompt": prompt, "echo": True, "logprobs": 0, "max_tokens": 0}
        if eft:
            body["eft"] = eft
        out = await complete(api, **body)
        return out["choices"][0]["logprobs"]["token_logprobs"][1:]

    plain = await scores(helpful=0, harmless=0)
    helpful = await scores(helpful=2.0)
    harmless = await scores(harmless=2.0)
    assert max(abs(a - b) for a, b in zip(plain, helpful, strict=True)) > 1e-3
    assert max(abs(a - b) for a, b in zip(helpful, harmless, strict=True)) > 1e-3
    # all weights 0 is exactly the large base alone (docs/math.md)
    base = await scores(model="tiny/large-base")
    assert max(abs(a - b) for a, b in zip(plain, base, strict=True)) < 1e-4
    # and the small expert alone is something else again
    expert = await scores(model="tiny/helpful")
    assert max(abs(a - b) for a, b in zip(base, expert, strict=True)) > 1e-3


async def test_seed_reproducible(api):
    body = {"prompt": "the", "max_tokens": 6, "temperature": 1.0, "seed": 1234, "n": 2}
    a, b = await complete(api, **body), await complete(api, **body)
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]


async def test_stop_string_and_stop_token_ids(api):
    body = {"prompt": "a king of salt", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "logprobs": 0}
    full = await complete(api, **body)
    text = full["choices"][0]["text"]
    stop = next((ch for ch in text[1:] if ch.isascii() and ch.isalnum()), None)
    if stop is not None:
        cut = await complete(api, **body, stop=[stop])
        assert cut["choices"][0]["finish_reason"] == "stop"
        assert cut["choices"][0]["text"] == text[: text.index(stop)]
    # stop_token_ids: the id of the third greedy token (found from its logprobs string)
    texts = TokenText(api.family.tokenizer)
    by_text = {texts.text(i): i for i in range(api.family.vocab_size)}
    strings = full["choices"][0]["logprobs"]["tokens"]
    target = by_text[strings[2]]
    if target not in [by_text[s] for s in strings[:2]]:
        out = await complete(api, **{**body, "stop_token_ids": [target]})
        c = out["choices"][0]
        assert c["finish_reason"] == "stop" and c["stop_reason"] == target
        assert out["usage"]["completion_tokens"] == 3


async def test_ignore_eos_min_tokens_length(api):
    out = await complete(api, prompt="north", max_tokens=5, min_tokens=5, ignore_eos=True,
                         top_k=5, min_p=0.01, repetition_penalty=1.1, top_p=0.9)
    c = out["choices"][0]
    assert c["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 5


async def test_completion_stream_framing_and_usage(api):
    body = {"model": "tiny", "prompt": "the river", "max_tokens": 4, "stream": True, "n": 2,
            "ignore_eos": True, "stream_options": {"include_usage": True}, "logprobs": 1}
    r = await api.client.post("/v1/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse(r.text)
    *chunks, last = events
    assert all(e["object"] == "text_completion" for e in events)
    assert len({e["id"] for e in events}) == 1
    assert all(e["usage"] is None for e in chunks)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 8
    finishes = {c["index"]: c["finish_reason"] for e in chunks for c in e["choices"]
                if c["finish_reason"]}
    assert finishes == {0: "length", 1: "length"}
    n_tokens = sum(len(c["logprobs"]["tokens"]) for e in chunks for c in e["choices"])
    assert n_tokens == 8
    # without include_usage there is no usage key at all
    r = await api.client.post("/v1/completions", json={**body, "stream_options": None})
    assert all("usage" not in e for e in sse(r.text))


async def test_prompt_logprobs_come_in_each_choices_first_streamed_chunk(api):
    body = {"model": "tiny", "prompt": "the river was founded", "max_tokens": 3, "n": 2,
            "temperature": 0, "prompt_logprobs": 2, "ignore_eos": True}
    plain = await complete(api, **body)
    r = await api.client.post("/v1/completions", json={**body, "stream": True})
    chunks = [c for e in sse(r.text) for c in e["choices"]]
    for idx in (0, 1):
        mine = [c for c in chunks if c["index"] == idx]
        assert mine[0]["prompt_logprobs"] == plain["choices"][idx]["prompt_logprobs"]
        assert all("prompt_logprobs" not in c for c in mine[1:])  # once, not per chunk


async def test_streamed_text_equals_non_streamed(api):
    body = {"model": "tiny", "prompt": "the river", "max_tokens": 5, "temperature": 0,
            "echo": True}
    plain = (await complete(api, **body))["choices"][0]["text"]
    r = await api.client.post("/v1/completions", json={**body, "stream": True})
    streamed = "".join(c["text"] for e in sse(r.text) for c in e["choices"])
    assert streamed == plain and plain.startswith("the river")


# ------------------------------------------------------------------------------ chat


async def test_chat_shape_logprobs_and_usage(api):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    out = await chat(api, messages=messages, logprobs=True, top_logprobs=3, n=2,
                     eft={"helpful": 0.7, "harmless": 0.3, "base_top_p": 0.9})
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["eft"]["base_top_p"] == 0.9
    assert len(out["choices"]) == 2
    for c in out["choices"]:
        assert c["message"]["role"] == "assistant"
        content = c["logprobs"]["content"]
        assert len(content) == out["usage"]["completion_tokens"] // 2 or content
        for item in content:
            assert set(item) >= {"token", "logprob", "bytes", "top_logprobs"}
            assert len(item["top_logprobs"]) == 3 and isinstance(item["bytes"], list)
            assert math.isfinite(item["logprob"]) and item["logprob"] <= 0
    rendered = api.family.render_chat([{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": "hello"}])
    assert out["usage"]["prompt_tokens"] == max(len(v) for v in rendered.values())


async def test_chat_stream_role_first_then_content(api):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    r = await api.client.post("/v1/chat/completions", json=body)
    events = sse(r.text)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert all("role" not in e["choices"][0]["delta"] for e in events[1:-1])
    plain = await chat(api, **{**body, "stream": False, "stream_options": None,
                               "temperature": 0})
    r = await api.client.post("/v1/chat/completions", json={**body, "temperature": 0})
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in sse(r.text)[:-1])
    assert text == plain["choices"][0]["message"]["content"]


async def test_chat_single_model_and_max_tokens_default(api):
    out = await chat(api, model="tiny/helpful", max_tokens=None, max_completion_tokens=2)
    assert out["usage"]["completion_tokens"] <= 2 and out["eft"] is None


# ------------------------------------------------------------------------------ tokenize


async def test_tokenize_detokenize(api):
    tok = api.family.tokenizer
    r = await api.client.post("/tokenize", json={"prompt": "the river"})
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == tok.encode("the river") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == api.family.context_limit
    r = await api.client.post("/detokenize", json={"tokens": body["tokens"]})
    assert r.json() == {"prompt": "the river"}
    r = await api.client.post("/tokenize", json={"model": "tiny/helpful",
                                                 "messages": [{"role": "user", "content": "x"}]})
    assert r.json()["tokens"] == api.family.render_chat([{"role": "user", "content": "x"}])[
        "helpful"]
