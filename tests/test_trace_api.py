"""`"eft": {"trace": true}` over HTTP: each model's log-prob of every token, by role, equal to
independent full-sequence forwards (completions, chat, streaming, echo scoring)."""

from __future__ import annotations

import json

import pytest
import torch

from decoding.engine import EngineConfig
from server.app import ServerSettings

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("one_torch_thread")]

KNOBS = {"helpful": 0.7, "harmless": 0.3}


@pytest.fixture(scope="module")
async def api(tiny_family, serve_app):
    async with serve_app(tiny_family, EngineConfig(max_batch_size=8), ServerSettings()) as s:
        yield s


@torch.inference_mode()
def lps(family, name: str, ids: list[int]) -> torch.Tensor:
    logits = family.models[name].module(torch.tensor([ids])).logits[0, :, : family.vocab_size]
    return torch.log_softmax(logits.float(), -1).clamp_min(-1e4)


def check(family, ids: list[int], trace: list[dict], start: int) -> None:
    """Entry j describes token ids[start + j] predicted from ids[: start + j]."""
    ref = {m: lps(family, m, ids) for m in ("large-base", "small-base", "helpful", "harmless")}
    for j, e in enumerate(trace):
        pos, tok = start + j - 1, ids[start + j]
        assert e["token_id"] == tok
        assert abs(e["base"] - ref["large-base"][pos, tok].item()) < 1e-4
        assert abs(e["reference"] - ref["small-base"][pos, tok].item()) < 1e-4
        for x in ("helpful", "harmless"):
            assert abs(e["experts"][x] - ref[x][pos, tok].item()) < 1e-4
            want = ref[x][pos, tok].item() - ref["small-base"][pos, tok].item()
            assert abs(e["rewards"][x] - want) < 1e-4
        assert e["changed_vs_base"] == (tok != int(ref["large-base"][pos].argmax()))
        assert e["changed_vs_expert"] == (tok != int(ref["helpful"][pos].argmax()))


async def test_completion_trace_matches_full_forwards(api, tiny_family):
    r = await api.client.post(
        "/v1/completions",
        json={
            "model": "tiny",
            "prompt": "the river city",
            "max_tokens": 5,
            "temperature": 1.0,
            "seed": 3,
            "ignore_eos": True,
            "eft": {**KNOBS, "trace": True},
        },
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    prompt = tiny_family.tokenizer.encode("the river city")
    out = [e["token_id"] for e in choice["trace"]]
    assert len(out) == 5 and "prompt_trace" not in choice
    check(tiny_family, prompt + out, choice["trace"], len(prompt))
    assert r.json()["eft"] == {**KNOBS}  # the echoed knobs are the weights, not the switch


async def test_streamed_chat_carries_the_trace_of_its_tokens(api, tiny_family):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "where is the river?"}],
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "eft": {**KNOBS, "trace": True},
    }
    r = await api.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    chunks = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
    trace = [e for c in chunks for ch in c["choices"] for e in ch.get("trace") or []]
    assert len(trace) == 4
    rendered = tiny_family.render_chat([{"role": "user", "content": "where is the river?"}])
    prompt = rendered["large-base"]
    assert all(p == prompt for p in rendered.values())  # one template: one prompt to check
    check(tiny_family, prompt + [e["token_id"] for e in trace], trace, len(prompt))


async def test_echo_scoring_traces_every_prompt_token(api, tiny_family):
    text = "a king of salt and copper was founded"
    r = await api.client.post(
        "/v1/completions",
        json={
            "model": "tiny",
            "prompt": text,
            "max_tokens": 0,
            "echo": True,
            "logprobs": 0,
            "eft": {**KNOBS, "trace": True},
        },
    )
    assert r.status_code == 200, r.text
    pt = r.json()["choices"][0]["prompt_trace"]
    ids = tiny_family.tokenizer.encode(text)
    assert pt[0] is None and len(pt) == len(ids)
    check(tiny_family, ids, pt[1:], 1)


async def test_trace_is_off_by_default_and_must_be_a_boolean(api):
    r = await api.client.post(
        "/v1/completions", json={"model": "tiny", "prompt": "north", "max_tokens": 2}
    )
    assert "trace" not in r.json()["choices"][0]
    r = await api.client.post(
        "/v1/completions",
        json={"model": "tiny", "prompt": "north", "max_tokens": 2, "eft": {"trace": 1}},
    )
    assert r.status_code == 400 and "eft.trace" in r.json()["error"]["message"]
