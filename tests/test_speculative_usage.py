"""`usage.eft_speculative` through HTTP: a real `eft-serve --speculative 2` process, the official
`openai` client, completions and chat, streamed and not.

Each response's drafted/accepted counts must equal what the server's own speculative counters
grew by during that request (the requests run one at a time), so the field is the sum over the
request's `n` choices, and a request that did not speculate has no field at all.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.process import ServerProcess

FAMILY = "tiny"
DRAFTED = "eft_spec_decode_draft_tokens_total"
ACCEPTED = "eft_spec_decode_accepted_tokens_total"
DRAFTS = "eft_spec_decode_num_drafts_total"
BLOCKS = "eft_spec_decode_acceptance_rate_count"  # per drafter: blocks it drafted
SHARES = "eft_spec_decode_acceptance_rate_sum"  # ... and the sum of their accepted shares


@pytest.fixture(scope="module")
def server(tiny_family_path, tmp_path_factory):
    log = Path(tmp_path_factory.mktemp("eft-serve-spec")) / "server.log"
    with ServerProcess(tiny_family_path, "--speculative", "2", "--threads", "1",
                       log_path=log, ready_timeout=90) as srv:  # fmt: skip
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)


def counters(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    return {
        s.name + (f"/{s.labels['drafter']}" if "drafter" in s.labels else ""): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name in (DRAFTED, ACCEPTED, DRAFTS, BLOCKS, SHARES)
    }


def spec_usage(usage) -> dict | None:
    # The SDK keeps fields it does not know in `model_extra`.
    return (usage.model_extra or {}).get("eft_speculative")


def call(client, endpoint: str, stream: bool, eft: dict, n: int = 1):
    """One greedy request; its usage object (the last chunk's when streamed)."""
    common = dict(model=FAMILY, max_tokens=10, temperature=0, n=n,
                  extra_body={"eft": eft, "ignore_eos": True})  # fmt: skip
    if stream:
        common.update(stream=True, stream_options={"include_usage": True})
    if endpoint == "completions":
        r = client.completions.create(prompt="the river city", **common)
    else:
        messages = [{"role": "user", "content": "what is the capital"}]
        r = client.chat.completions.create(messages=messages, **common)
    if not stream:
        return r.usage
    chunks = list(r)
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    return chunks[-1].usage


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_usage_reports_drafted_and_accepted_tokens_of_every_choice(server, client, endpoint,
                                                                   stream):  # fmt: skip
    before = counters(server)
    usage = call(client, endpoint, stream, {"helpful": 1.0}, n=2)
    after = counters(server)
    spec = spec_usage(usage)
    assert spec is not None, usage
    assert set(spec) == {"drafted_tokens", "accepted_tokens"}
    assert 0 < spec["drafted_tokens"] == after[DRAFTED] - before[DRAFTED]
    assert 0 <= spec["accepted_tokens"] == after[ACCEPTED] - before[ACCEPTED]
    assert spec["accepted_tokens"] <= spec["drafted_tokens"]
    assert usage.completion_tokens == 20  # both choices ran to max_tokens
    # Two choices, each at least one verify round (blocks of at most 2 tokens).
    assert after[DRAFTS] - before[DRAFTS] >= 2
    # Every block is in the helpful expert's acceptance histogram (it drafted them all).
    blocks = after[f"{BLOCKS}/helpful"] - before[f"{BLOCKS}/helpful"]
    assert blocks == after[DRAFTS] - before[DRAFTS]
    assert after[f"{BLOCKS}/harmless"] == before[f"{BLOCKS}/harmless"]
    assert 0 <= after[f"{SHARES}/helpful"] - before[f"{SHARES}/helpful"] <= blocks


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(
    "eft", [{"helpful": 1.0, "speculative": False}, {"helpful": 0.0}], ids=["opted-out", "base"]
)
def test_a_request_that_did_not_speculate_has_no_speculative_usage(server, client, eft, stream):
    before = counters(server)
    usage = call(client, "chat", stream, eft)
    assert counters(server)[DRAFTED] == before[DRAFTED]
    assert usage.completion_tokens == 10
    assert "eft_speculative" not in (usage.model_extra or {}), usage
