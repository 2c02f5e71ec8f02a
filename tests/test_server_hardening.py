"""Hostile input and the API's edges, in process against the real engine: no body gives a 5xx,
work is bounded before it is spent, strict JSON types, JSON-only bodies, one admission unit per
request, KV gauges after a cancel, SSE pings, X-Request-Id, and an OpenAPI document that
describes the real API."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import pytest

from decoding.engine import Engine, EngineConfig
from decoding.request import StepStats
from server.app import ServerSettings, create_app
from server.metrics import ServerMetrics

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("one_torch_thread")]

ROUTES = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")
OK_COMPLETION = {"model": "tiny", "prompt": "the", "max_tokens": 2}
OK_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
async def srv(tiny_family, serve_app):
    async with serve_app(
        tiny_family,
        EngineConfig(max_batch_size=8, max_waiting=8),
        ServerSettings(max_body_bytes=8 * 1024 * 1024),
    ) as s:
        yield s


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60
    )


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param, err
    return err


def failures(srv, reason: str) -> float:
    return srv.metrics.registry.get_sample_value("eft_request_failure_total", {"reason": reason})


# ------------------------------------------------------------------ 1. no input gives a 5xx


@pytest.mark.parametrize("depth", [40, 1000, 100_000])
async def test_deeply_nested_body_is_400_not_500(srv, depth):
    errors = failures(srv, "error")
    nested = "[" * depth + "]" * depth
    bodies = [nested, f'{{"model": "tiny", "prompt": "x", "extra": {nested}}}']
    for path in ROUTES:
        for body in bodies:
            r = await srv.client.post(path, content=body, headers=JSON)
            err = assert_error(r, 400)
            assert err["code"] == "invalid_json" or "object" in err["message"], err
    assert failures(srv, "error") == errors  # no 500 counted: the error-ratio alert stays quiet


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/completions", '{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
        (
            "/v1/completions",
            '{"model": "tiny", "prompt": ["ok", "\\udfff"], "max_tokens": 1}',
            "prompt",
        ),
        (
            "/v1/chat/completions",
            '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud83d"}]}',
            "messages.content",
        ),
        ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
        ("/v1/completions", '{"model": "\\ud800", "prompt": "x", "max_tokens": 1}', "model"),
        ("/v1/completions", '{"model": "tiny", "prompt": "x", "\\ud800": 1}', None),
    ],
)
async def test_lone_surrogate_is_400_with_a_json_body(srv, path, body, param):
    r = await srv.client.post(path, content=body, headers=JSON)
    err = assert_error(r, 400, param)
    assert "surrogate" in err["message"]


async def test_error_message_quoting_input_always_encodes(srv):
    # A 404 quotes the model id; the body must be valid UTF-8 JSON whatever the id holds.
    r = await srv.client.get("/v1/models/caf%C3%A9-%F0%9F%90%8D")
    assert_error(r, 404, "model")


# ------------------------------------------------------------------ 2. cost before validation


async def test_text_that_cannot_fit_is_refused_without_tokenizing(srv, monkeypatch):
    handlers_tok = srv.family.tokenizer
    seen: list[int] = []
    real = handlers_tok.encode

    def spy(text, *a, **kw):
        seen.append(len(text))
        return real(text, *a, **kw)

    monkeypatch.setattr(handlers_tok, "encode", spy)
    ctx = srv.family.context_limit
    longest = max(len(p) for p in handlers_tok.get_vocab())
    big = "river " * (ctx * longest // 6 + 10)  # one character more than ctx tokens can spell
    t0 = time.monotonic()
    for path, body in [
        ("/v1/completions", {**OK_COMPLETION, "prompt": big}),
        ("/v1/completions", {**OK_COMPLETION, "prompt": ["the", big]}),
        ("/v1/chat/completions", {**OK_CHAT, "messages": [{"role": "user", "content": big}]}),
        ("/tokenize", {"prompt": big}),
    ]:
        r = await srv.client.post(path, json=body)
        err = assert_error(r, 400)
        assert err["code"] == "context_length_exceeded"
        assert f"maximum context length is {ctx} tokens" in err["message"]
    assert all(n < len(big) for n in seen), "the over-long text was tokenized"
    assert time.monotonic() - t0 < 5
    # A text within the bound is still tokenized and answered as before.
    r = await srv.client.post("/tokenize", json={"prompt": "the river " * 50})
    assert r.status_code == 200 and r.json()["count"] > 50


# ------------------------------------------------------------------ 4. one admission unit


async def test_multi_prompt_request_is_admitted_as_one_unit(tiny_family):
    engine = Engine(tiny_family, EngineConfig(max_batch_size=8, max_waiting=2))
    engine.start()
    app = create_app(engine, tiny_family, ServerSettings())
    try:
        async with client_for(app) as c:
            body = {**OK_COMPLETION, "prompt": ["a", "b", "c", "d", "e"], "max_tokens": 1}
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert len(r.json()["choices"]) == 5
    finally:
        await engine.shutdown()


async def test_free_batch_slot_is_never_refused(tiny_family):
    # max_waiting 0: nothing may wait, but an idle engine has free slots to admit into.
    engine = Engine(tiny_family, EngineConfig(max_batch_size=4, max_waiting=0))
    engine.start()
    app = create_app(engine, tiny_family, ServerSettings())
    try:
        async with client_for(app) as c:
            r = await c.post("/v1/completions", json=OK_COMPLETION)
            assert r.status_code == 200, r.text
    finally:
        await engine.shutdown()


# ------------------------------------------------------------------ 6. KV gauges after a cancel


def kv_tokens(srv) -> dict[str, float]:
    return {
        m: srv.metrics.registry.get_sample_value("eft_kv_cache_tokens", {"model": m})
        for m in srv.family.models
    }


async def test_kv_gauges_drop_when_the_last_request_is_cancelled(srv):
    body = json.dumps({**OK_COMPLETION, "max_tokens": 400, "ignore_eos": True}).encode()
    gone = asyncio.Event()
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        pass

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000),
        "server": ("test", 80),
    }
    task = asyncio.ensure_future(srv.app(scope, receive, send))
    deadline = time.monotonic() + 20
    while not any(kv_tokens(srv).values()):  # the models this composition runs hold a cache
        assert time.monotonic() < deadline, kv_tokens(srv)
        await asyncio.sleep(0.01)
    gone.set()
    await asyncio.wait_for(task, 5)
    deadline = time.monotonic() + 2
    while any(kv_tokens(srv).values()):
        assert time.monotonic() < deadline, f"KV gauges stale after the cancel: {kv_tokens(srv)}"
        await asyncio.sleep(0.01)


def test_kv_gauges_follow_a_cancel_only_report():
    m = ServerMetrics(["a", "b"], [])
    m.on_step(StepStats(1, 1, 0, kv_cache_tokens={"a": 30, "b": 31}))
    # a report that carries the figures (what the engine sends after a cancel)
    m.on_step(StepStats(0, 1, 0, kv_cache_tokens={"a": 12, "b": 13}, finished=[("r", "abort")]))
    assert m.registry.get_sample_value("eft_kv_cache_tokens", {"model": "a"}) == 12
    # one without them, when nothing is left running or waiting
    m.on_step(StepStats(0, 0, 0, finished=[("r2", "abort")]))
    assert m.registry.get_sample_value("eft_kv_cache_tokens", {"model": "b"}) == 0


# ------------------------------------------------------------------ 7. strict types, OpenAPI


@pytest.mark.parametrize(
    "path,override,param",
    [
        ("/v1/completions", {"max_tokens": "5"}, "max_tokens"),
        ("/v1/completions", {"stream": "true"}, "stream"),
        ("/v1/completions", {"prompt": [[False]]}, "prompt"),
        ("/v1/completions", {"n": 2.0}, "n"),
        ("/v1/completions", {"echo": 1}, "echo"),
        ("/v1/chat/completions", {"logprobs": "yes"}, "logprobs"),
        ("/v1/chat/completions", {"seed": "1"}, "seed"),
    ],
)
async def test_json_types_are_strict(srv, path, override, param):
    base = OK_CHAT if "chat" in path else OK_COMPLETION
    r = await srv.client.post(path, json={**base, **override})
    assert_error(r, 400, param)


async def test_detokenize_refuses_booleans_as_token_ids(srv):
    err = assert_error(await srv.client.post("/detokenize", json={"tokens": [True]}), 400)
    assert err["param"].startswith("tokens"), err


async def test_openapi_describes_the_real_api(srv):
    doc = (await srv.client.get("/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    bodies = {
        "/v1/completions": "CompletionRequest",
        "/v1/chat/completions": "ChatCompletionRequest",
        "/tokenize": "TokenizeRequest",
        "/detokenize": "DetokenizeRequest",
    }
    for path, model in bodies.items():
        op = doc["paths"][path]["post"]
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": f"#/components/schemas/{model}"}
        responses = op["responses"]
        assert "422" not in responses
        for status in ("400", "401", "404", "413", "415", "429", "500", "503"):
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorResponse"), (path, status)
        assert "Retry-After" in responses["429"]["headers"]
    req = schemas["CompletionRequest"]
    assert req["properties"]["n"]["maximum"] == 16 and req["properties"]["n"]["type"] == "integer"
    assert "model" in req["required"] and "prompt" in req["required"]
    chat_ok = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(chat_ok) == {"application/json", "text/event-stream"}
    for item in doc["paths"].values():
        for op in item.values():
            assert "422" not in op["responses"]


# ------------------------------------------------------------------ 8. JSON bodies only


@pytest.mark.parametrize(
    "ctype",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None],
)
async def test_non_json_content_type_is_415(srv, ctype):
    headers = {"content-type": ctype} if ctype else {}
    before = srv.engine.num_running
    for path in ROUTES:
        r = await srv.client.post(path, content=json.dumps(OK_COMPLETION), headers=headers)
        err = assert_error(r, 415)
        assert err["code"] == "unsupported_media_type"
    assert srv.engine.num_running == before


async def test_json_with_charset_is_accepted(srv):
    r = await srv.client.post(
        "/v1/completions",
        content=json.dumps(OK_COMPLETION),
        headers={"content-type": "Application/JSON; charset=utf-8"},
    )
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------ 9. pings and request ids


async def test_queued_stream_sends_comment_pings_and_keeps_the_wire_format(tiny_family):
    engine = Engine(tiny_family, EngineConfig(max_batch_size=1, max_waiting=4))
    engine.start()
    app = create_app(engine, tiny_family, ServerSettings(sse_ping_s=0.05))
    try:
        async with client_for(app) as c:
            long = asyncio.ensure_future(
                c.post(
                    "/v1/completions", json={**OK_COMPLETION, "max_tokens": 120, "ignore_eos": True}
                )
            )
            while engine.num_running == 0:
                await asyncio.sleep(0.01)
            r = await c.post("/v1/completions", json={**OK_COMPLETION, "stream": True})
            assert (await long).status_code == 200
        assert r.status_code == 200
        blocks = r.text.split("\n\n")
        assert blocks[0] == ": ping", r.text[:200]  # it waited in the queue, pinging
        data = [b for b in blocks if b.startswith("data: ")]
        assert data[-1] == "data: [DONE]"
        assert all(b in (": ping", "") or b.startswith("data: ") for b in blocks)
        assert json.loads(data[0][6:])["object"] == "text_completion"
    finally:
        await engine.shutdown()


async def test_every_response_carries_a_request_id(srv, caplog):
    seen = set()
    for method, path, kw in [
        ("GET", "/health", {}),
        ("GET", "/v1/models/nope", {}),
        ("POST", "/v1/completions", {"json": OK_COMPLETION}),
        ("POST", "/v1/completions", {"content": "x"}),
        ("POST", "/v1/completions", {"json": {**OK_COMPLETION, "stream": True}}),
    ]:
        r = await srv.client.request(method, path, **kw)
        rid = r.headers["x-request-id"]
        assert len(rid) == 32 and rid not in seen
        seen.add(rid)
    with caplog.at_level(logging.DEBUG, logger="eft_serve"):
        r = await srv.client.post(
            "/v1/completions",
            json={**OK_COMPLETION, "n": 99},
            headers={"X-Request-Id": "client-id-42"},
        )
    assert r.status_code == 400 and r.headers["x-request-id"] == "client-id-42"
    assert any("[client-id-42]" in rec.getMessage() for rec in caplog.records)
    # an unusable id (too long, odd bytes) is replaced, not echoed
    r = await srv.client.get("/health", headers={"X-Request-Id": "x" * 500})
    assert r.headers["x-request-id"] != "x" * 500
