"""A real `eft-serve` process on a free loopback port, driven by the official `openai` SDK.

This is what a user does: start the console script on a family, point `openai.OpenAI` at it,
and send the knobs with `extra_body={"eft": {...}}`. The server runs with an API key and a
tiny queue (so that 429 is reachable), and the last test stops it with SIGTERM mid-request.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.process import ServerProcess

KEY = "test-key-123"


class Server(ServerProcess):
    """The server under test, with the limits the 429 and disconnect tests rely on."""

    def __init__(self, family_yaml: Path, log_path: Path):
        super().__init__(
            family_yaml, "--api-key", KEY, "--max-batch-size", "4", "--max-waiting", "2",
            "--shutdown-timeout", "20", "--log-level", "info", "--threads", "1",
            log_path=log_path, ready_timeout=90,
        )

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        raise KeyError(name)


@pytest.fixture(scope="module")
def server(tiny_family_path, tmp_path_factory):
    with Server(tiny_family_path, tmp_path_factory.mktemp("eft-serve") / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    # max_retries=0: the SDK retries 429 by default, which would hide the status under test.
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


FAMILY = "tiny"


def test_models(client):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == FAMILY and f"{FAMILY}/helpful" in ids and len(ids) == 5


def test_completions_n2_logprobs_and_knob_echo(client):
    r = client.completions.create(model=FAMILY, prompt="the river city", max_tokens=4, n=2,
                                  logprobs=2, temperature=1.0, seed=7,
                                  extra_body={"eft": {"helpfulness": 0.7, "harmless": 0.3}})
    assert len(r.choices) == 2 and {c.index for c in r.choices} == {0, 1}
    for c in r.choices:
        assert c.finish_reason in ("stop", "length")
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs)
        assert all(len(d) >= 2 for d in c.logprobs.top_logprobs)
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)
    assert r.model_extra["eft"] == {"helpful": 0.7, "harmless": 0.3}


def test_completions_stream_with_usage(client):
    stream = client.completions.create(model=FAMILY, prompt="the king", max_tokens=5,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert isinstance(text, str)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 5


def test_chat_and_chat_stream(client):
    msgs = [{"role": "user", "content": "where is the river?"}]
    r = client.chat.completions.create(model=FAMILY, messages=msgs, max_tokens=4, logprobs=True,
                                       top_logprobs=2, temperature=0,
                                       extra_body={"eft": {"helpful": 1.0, "base_top_p": 0.9}})
    (c,) = r.choices
    assert c.message.role == "assistant"
    assert all(len(t.top_logprobs) == 2 and t.bytes is not None for t in c.logprobs.content)
    assert r.model_extra["eft"]["base_top_p"] == 0.9
    stream = client.chat.completions.create(model=FAMILY, messages=msgs, max_tokens=4,
                                            temperature=0, stream=True,
                                            extra_body={"eft": {"helpful": 1.0,
                                                                "base_top_p": 0.9}})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert streamed == c.message.content
    assert chunks[-1].choices[0].finish_reason == c.finish_reason


def test_single_model_id(client):
    r = client.chat.completions.create(model=f"{FAMILY}/helpful", max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content is not None


def test_stop_and_seed(client):
    kw = {"model": FAMILY, "prompt": "a king of salt", "max_tokens": 8, "temperature": 0,
          "extra_body": {"ignore_eos": True}}
    text = client.completions.create(**kw).choices[0].text
    stop = next((ch for ch in text[1:] if ch.isascii() and ch.isalnum()), None)
    if stop is not None:
        c = client.completions.create(**kw, stop=[stop]).choices[0]
        assert c.finish_reason == "stop" and c.text == text[: text.index(stop)]
    sampled = {"model": FAMILY, "prompt": "the", "max_tokens": 6, "temperature": 1.0, "seed": 99}
    a = client.completions.create(**sampled).choices[0].text
    b = client.completions.create(**sampled).choices[0].text
    assert a == b


def test_knobs_change_the_distribution(client):
    def score(**eft):
        r = client.completions.create(model=FAMILY, prompt="the river city was founded",
                                      max_tokens=0, echo=True, logprobs=0,
                                      extra_body={"eft": eft})
        lps = r.choices[0].logprobs.token_logprobs
        assert lps[0] is None
        return lps[1:]

    zero, helpful, harmless = score(helpful=0), score(helpful=2), score(harmless=2)
    assert max(abs(a - b) for a, b in zip(zero, helpful, strict=True)) > 1e-3
    assert max(abs(a - b) for a, b in zip(helpful, harmless, strict=True)) > 1e-3


def test_errors_400_401_404(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=FAMILY, prompt="x", max_tokens=2,
                                  extra_body={"eft": {"helpful": -1}})
    assert e.value.status_code == 400 and e.value.param == "eft.helpful"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=FAMILY, max_tokens=2, n=17,
                                       messages=[{"role": "user", "content": "x"}])
    assert e.value.param == "n"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=FAMILY, prompt="x", max_tokens=2,
                                  stream_options={"include_usage": True})
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt="x", max_tokens=2)
    assert e.value.code == "model_not_found"
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200  # stays open


def test_429_when_the_queue_is_full(server, client):
    results: list[object] = []

    def one() -> None:
        try:
            results.append(client.completions.create(model=FAMILY, prompt="the", max_tokens=25,
                                                     extra_body={"ignore_eos": True}))
        except openai.APIStatusError as exc:
            results.append(exc)

    # batch 4 + queue 2: eight at once cannot all be taken
    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert limited, [type(r).__name__ for r in results]
    assert all(int(r.response.headers["retry-after"]) >= 1 for r in limited)
    assert server.metric("eft_request_failure_total", reason="overloaded") >= len(limited)


def test_disconnect_mid_stream_frees_the_slot(server, client):
    stream = client.completions.create(model=FAMILY, prompt="the", max_tokens=400, stream=True,
                                       extra_body={"ignore_eos": True})
    it = iter(stream)
    for _ in range(3):
        next(it)
    assert server.metric("eft_num_requests_running") == 1
    stream.close()  # drops the connection, as a client that goes away does
    deadline = time.monotonic() + 1.0
    while server.metric("eft_num_requests_running") != 0:
        assert time.monotonic() < deadline, "the request still runs 1 s after the disconnect"
        time.sleep(0.05)
    assert server.metric("eft_request_failure_total", reason="aborted") >= 1


def test_sigterm_lets_inflight_finish_then_exits_0(server):
    """Last in the module: stops the shared server."""
    body = {"model": FAMILY, "prompt": "the", "max_tokens": 20, "stream": True,
            "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    lines: list[str] = []
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers,
                      timeout=60) as r:
        it = r.iter_lines()
        for line in it:
            if line.startswith("data: "):
                lines.append(line)
                break
        server.proc.send_signal(signal.SIGTERM)
        lines += [line for line in it if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    assert '"finish_reason":"length"' in lines[-2]
    assert server.proc.wait(30) == 0, server.output()[-2000:]
