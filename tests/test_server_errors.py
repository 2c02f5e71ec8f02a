"""Every error path of the HTTP layer, in process, against the real engine: 400/401/404/413/429,
OpenAI error bodies, disconnect -> cancel, /health, /ready, /metrics."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from decoding.engine import Engine, EngineConfig
from server.app import ServerSettings, create_app
from server.metrics import ServerMetrics

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("one_torch_thread")]

KEY = "s3cret-key"


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                             timeout=60)


@pytest.fixture(scope="module")
async def srv(tiny_family, serve_app):
    async with serve_app(tiny_family, EngineConfig(max_batch_size=8, max_waiting=8),
                         ServerSettings(max_body_bytes=64 * 1024)) as s:
        yield s


def assert_error(r: httpx.Response, status: int, param: str | None = None,
                 contains: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if contains is not None:
        assert contains in err["message"], err
    return err


def metric(text: str, name: str, **labels) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(f"{name}{labels}")


OK_COMPLETION = {"model": "tiny", "prompt": "the", "max_tokens": 2}
OK_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

# (route, body overrides, param named in the error)
BAD_REQUESTS = [
    ("c", {"n": 17}, "n"),
    ("c", {"n": 0}, "n"),
    ("c", {"logprobs": 21}, "logprobs"),
    ("c", {"max_tokens": -1}, "max_tokens"),
    ("c", {"max_tokens": 0}, None),  # 0 only with echo
    ("c", {"temperature": 2.5}, "temperature"),
    ("c", {"top_p": 0}, "top_p"),
    ("c", {"stop": [str(i) for i in range(9)]}, "stop"),
    ("c", {"stop": [""]}, "stop"),
    ("c", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("c", {"prompt": []}, "prompt"),
    ("c", {"prompt": ""}, "prompt"),
    ("c", {"prompt": [1, 2, 100000]}, "prompt"),
    ("c", {"prompt": 5}, "prompt"),
    ("c", {"seed": 2**64}, "seed"),
    ("c", {"logit_bias": {"5": 10}}, "logit_bias"),
    ("c", {"stop_token_ids": [10**6]}, "stop_token_ids"),
    ("c", {"min_tokens": 5}, None),  # > max_tokens
    ("c", {"best_of": 3}, None),
    ("c", {"eft": {"helpful": -0.5}}, "eft.helpful"),
    ("c", {"eft": {"helpful": 100}}, "eft.helpful"),
    ("c", {"eft": {"helpful": "a lot"}}, "eft.helpful"),
    ("c", {"eft": {"helpful": True}}, "eft.helpful"),
    ("c", {"eft": {"evil": 1}}, "eft.evil"),
    ("c", {"eft": {"helpfulness": 1, "helpful": 1}}, "eft.helpfulness"),
    ("c", {"eft": {"base_top_p": 0}}, "eft.base_top_p"),
    ("c", {"eft": {"base_top_p": 1.5}}, "eft.base_top_p"),
    ("c", {"eft": {"plausibility": 1}}, "eft.plausibility"),
    ("c", {"eft": [1, 2]}, "eft"),
    ("c", {"model": "tiny/helpful", "eft": {"helpful": 1}}, "eft"),
    ("c", {"model": None}, "model"),
    ("h", {"messages": []}, "messages"),
    ("h", {"messages": [{"role": "wizard", "content": "x"}]}, None),
    ("h", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ("h", {"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ("h", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ("h", {"stream_options": {"include_usage": True}, "stream": False}, "stream_options"),
    ("h", {"response_format": {"type": "xml"}}, "response_format.type"),
    ("h", {"max_tokens": 0}, "max_tokens"),
]


@pytest.mark.parametrize("route,override,param", BAD_REQUESTS,
                         ids=[f"{r}-{json.dumps(o)[:40]}" for r, o, _ in BAD_REQUESTS])
async def test_validation_is_400_naming_the_param(srv, route, override, param):
    path, base = (("/v1/completions", OK_COMPLETION) if route == "c"
                  else ("/v1/chat/completions", OK_CHAT))
    r = await srv.client.post(path, json={**base, **override})
    err = assert_error(r, 400, param)
    assert err["type"] == "invalid_request_error"


async def test_non_finite_weight_is_400(srv):
    # Python's json accepts NaN/Infinity literals; they must not reach the engine.
    body = '{"model": "tiny", "prompt": "x", "max_tokens": 1, "eft": {"helpful": NaN}}'
    r = await srv.client.post("/v1/completions", content=body,
                              headers={"content-type": "application/json"})
    assert_error(r, 400, "eft.helpful", "finite")


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", b"\xff\xfe", b'"a string"'])
async def test_malformed_json_is_400_never_422_or_500(srv, body):
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        r = await srv.client.post(path, content=body,
                                  headers={"content-type": "application/json"})
        assert_error(r, 400)


async def test_unknown_model_is_404(srv):
    r = await srv.client.post("/v1/completions", json={**OK_COMPLETION, "model": "gpt-4"})
    err = assert_error(r, 404, "model", "gpt-4")
    assert err["code"] == "model_not_found"
    r = await srv.client.post("/v1/chat/completions", json={**OK_CHAT, "model": "tiny/nope"})
    assert_error(r, 404, "model")
    r = await srv.client.get("/v1/models/nope")
    assert_error(r, 404, "model")
    r = await srv.client.post("/tokenize", json={"model": "nope", "prompt": "x"})
    assert_error(r, 404, "model")


async def test_unknown_route_and_method_in_openai_shape(srv):
    assert_error(await srv.client.get("/v1/nothing"), 404)
    assert_error(await srv.client.get("/v1/completions"), 405)


async def test_context_length_is_400_with_vllm_wording(srv):
    limit = srv.family.context_limit
    body = {**OK_COMPLETION, "prompt": [5] * (limit - 10), "max_tokens": 20}
    r = await srv.client.post("/v1/completions", json=body)
    err = assert_error(r, 400, "max_tokens",
                       f"This model's maximum context length is {limit} tokens")
    assert err["code"] == "context_length_exceeded"
    long_msg = [{"role": "user", "content": "the river " * limit}]
    r = await srv.client.post("/v1/chat/completions", json={**OK_CHAT, "messages": long_msg})
    assert_error(r, 400, "max_tokens", "maximum context length")


async def test_body_too_large_is_413(srv):
    r = await srv.client.post("/v1/completions",
                              json={**OK_COMPLETION, "prompt": "x" * 100_000})
    assert_error(r, 413)


async def test_unknown_openai_fields_are_ignored(srv):
    r = await srv.client.post("/v1/chat/completions",
                              json={**OK_CHAT, "parallel_tool_calls": False, "store": False,
                                    "metadata": {"a": "b"}, "user": "u1"})
    assert r.status_code == 200, r.text


async def test_detokenize_bad_id_is_400(srv):
    r = await srv.client.post("/detokenize", json={"tokens": [1, -3]})
    assert_error(r, 400, "tokens")
    r = await srv.client.post("/tokenize", json={"prompt": "a", "messages": []})
    assert_error(r, 400)


# ------------------------------------------------------------------------------ auth


async def test_api_key(srv):
    app = create_app(srv.engine, srv.family, ServerSettings(api_key=KEY),
                     metrics=ServerMetrics.for_family(srv.family))
    async with client_for(app) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}):
            r = await c.post("/v1/completions", json=OK_COMPLETION, headers=headers)
            err = assert_error(r, 401)
            assert err["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
        assert_error(await c.get("/v1/models"), 401)
        assert_error(await c.post("/tokenize", json={"prompt": "a"}), 401)
        assert_error(await c.post("/detokenize", json={"tokens": [1]}), 401)
        auth = {"Authorization": f"Bearer {KEY}"}
        assert (await c.post("/v1/completions", json=OK_COMPLETION, headers=auth)).status_code \
            == 200
        assert (await c.get("/v1/models", headers=auth)).status_code == 200
        for path in ("/health", "/ready", "/metrics"):
            assert (await c.get(path)).status_code == 200, path
        assert metric((await c.get("/metrics")).text, "eft_request_failure_total",
                      reason="unauthorized") == 7


# ------------------------------------------------------------------------------ overload


async def test_queue_full_is_429_with_retry_after(tiny_family):
    metrics = ServerMetrics.for_family(tiny_family)
    engine = Engine(tiny_family, EngineConfig(max_batch_size=1, max_waiting=1),
                    on_step=metrics.on_step)
    engine.start()
    app = create_app(engine, tiny_family, ServerSettings(), metrics=metrics)
    body = {"model": "tiny", "prompt": "the", "max_tokens": 40, "ignore_eos": True}
    try:
        async with client_for(app) as c:
            rs = await asyncio.gather(*[c.post("/v1/completions", json=body) for _ in range(4)])
            codes = sorted(r.status_code for r in rs)
            assert codes.count(429) >= 1 and codes.count(200) >= 1, codes
            for r in rs:
                if r.status_code == 429:
                    assert int(r.headers["retry-after"]) >= 1
                    assert assert_error(r, 429)["code"] == "rate_limit_exceeded"
            text = (await c.get("/metrics")).text
            assert metric(text, "eft_request_failure_total", reason="overloaded") == \
                codes.count(429)
    finally:
        await engine.shutdown()


# ------------------------------------------------------------------------------ disconnect


async def wait_until(pred, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def generated(srv) -> float:
    return srv.metrics.registry.get_sample_value("eft_generation_tokens_total")


def asgi_call(app, path: str, body: dict) -> tuple[asyncio.Future, asyncio.Event, list[dict]]:
    """Drive the ASGI app by hand: send the body, then, once the returned event is set,
    deliver `http.disconnect` as a server does when the client's socket closes. Spec 2.4 on
    purpose: Starlette's own StreamingResponse stops listening for the disconnect there."""
    raw = json.dumps(body).encode()
    sent: list[dict] = []
    gone = asyncio.Event()
    delivered = False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
             "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 5000), "server": ("test", 80)}
    return asyncio.ensure_future(app(scope, receive, send)), gone, sent


async def call_then_disconnect(srv, path: str, body: dict) -> list[dict]:
    """Disconnect once the engine generates for the request; check that it stops."""
    start = generated(srv)
    task, gone, sent = asgi_call(srv.app, path, body)
    for _ in range(1000):
        if generated(srv) >= start + 3:
            break
        await asyncio.sleep(0.01)
    assert generated(srv) >= start + 3, "the request never started generating"
    assert not task.done()
    gone.set()
    await asyncio.wait_for(task, 5)
    for _ in range(100):
        if srv.engine.num_running == 0:
            break
        await asyncio.sleep(0.01)
    assert srv.engine.num_running == 0 and srv.engine.num_waiting == 0
    # the sequence really left the batch: no more tokens are generated for it
    await asyncio.sleep(0.2)
    settled = generated(srv)
    await asyncio.sleep(0.3)
    assert generated(srv) == settled
    assert settled < start + 300  # far from the 400 tokens it asked for
    return sent


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_disconnect_cancels_the_request(srv, path, stream):
    before = metric((await srv.client.get("/metrics")).text, "eft_request_failure_total",
                    reason="aborted")
    base = OK_COMPLETION if "chat" not in path else OK_CHAT
    body = {**base, "max_tokens": 400, "ignore_eos": True, "stream": stream}
    await call_then_disconnect(srv, path, body)
    text = (await srv.client.get("/metrics")).text
    assert metric(text, "eft_request_failure_total", reason="aborted") == before + 1
    assert metric(text, "eft_num_requests_running") == 0


async def test_running_gauge_counts_a_running_request(srv):
    """eft_num_requests_running reads Engine.num_running live at scrape time."""
    body = {**OK_COMPLETION, "max_tokens": 12, "ignore_eos": True}
    start = generated(srv)
    task = asyncio.ensure_future(srv.client.post("/v1/completions", json=body))
    try:
        await wait_until(lambda: generated(srv) >= start + 3)
        text = (await srv.client.get("/metrics")).text
        assert metric(text, "eft_num_requests_running") == 1, \
            "Engine.num_running is 0 while a request decodes"
    finally:
        r = await task
    assert r.status_code == 200
    assert metric((await srv.client.get("/metrics")).text, "eft_num_requests_running") == 0


# ------------------------------------------------------------------------------ ops endpoints


async def test_ready_is_503_until_warmed_up(tiny_family):
    engine = Engine(tiny_family, EngineConfig(max_batch_size=2, max_waiting=2))
    app = create_app(engine, tiny_family, ServerSettings())
    try:
        async with client_for(app) as c:
            assert (await c.get("/health")).status_code == 200
            r = await c.get("/ready")
            assert r.status_code == 503 and r.json()["status"] == "warming up"
            engine.start()
            await engine.warmup()
            assert (await c.get("/ready")).status_code == 200
    finally:
        await engine.shutdown()


CONTRACT_METRICS = [
    "eft_num_requests_running", "eft_num_requests_waiting", "eft_request_success_total",
    "eft_request_failure_total", "eft_prompt_tokens_total", "eft_generation_tokens_total",
    "eft_time_to_first_token_seconds_bucket", "eft_inter_token_latency_seconds_bucket",
    "eft_e2e_request_latency_seconds_bucket", "eft_batch_size_bucket",
    "eft_model_forward_seconds_bucket", "eft_spec_decode_draft_tokens_total",
    "eft_spec_decode_accepted_tokens_total", "eft_knob_requests_total",
    "eft_combine_seconds_bucket", "eft_sample_seconds_bucket", "eft_step_seconds_bucket",
    "eft_kv_cache_tokens", "eft_kv_cache_bytes", "process_resident_memory_bytes",
    "python_gc_objects_collected_total",
]


async def test_metrics_names_labels_and_values(srv):
    c = srv.client
    r = await c.post("/v1/completions", json={**OK_COMPLETION, "max_tokens": 3, "ignore_eos": True,
                                              "eft": {"helpful": 0.5, "harmless": 0.5}})
    assert r.status_code == 200
    await c.post("/v1/completions", json={**OK_COMPLETION, "n": 99})
    r = await c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    names = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    missing = [n for n in CONTRACT_METRICS if n not in names]
    assert not missing, missing
    # label sets exist from the start, finite
    for reason in ("validation", "overloaded", "aborted", "error", "unauthorized"):
        metric(text, "eft_request_failure_total", reason=reason)
    for m in srv.family.models:
        assert metric(text, "eft_model_forward_seconds_count", model=m) > 0
        metric(text, "eft_kv_cache_tokens", model=m)
    assert metric(text, "eft_knob_requests_total", expert="helpful") >= 1
    assert metric(text, "eft_knob_requests_total", expert="harmless") >= 1
    assert metric(text, "eft_request_failure_total", reason="validation") >= 1
    assert metric(text, "eft_request_success_total", finished_reason="length") >= 1
    assert metric(text, "eft_generation_tokens_total") >= 3
    assert metric(text, "eft_prompt_tokens_total") >= 1
    assert metric(text, "eft_time_to_first_token_seconds_count") >= 1
    assert metric(text, "eft_inter_token_latency_seconds_count") >= 2
    assert metric(text, "eft_e2e_request_latency_seconds_count") >= 1
    assert metric(text, "eft_batch_size_count") >= 1
    assert metric(text, "eft_combine_seconds_count") >= 1
    assert metric(text, "eft_ready") == 1


async def test_drain_refuses_new_work_and_unreadies(srv):
    """What SIGTERM triggers (the CLI calls app.state.begin_drain from its signal handler)."""
    app = create_app(srv.engine, srv.family, ServerSettings(),
                     metrics=ServerMetrics.for_family(srv.family))
    async with client_for(app) as c:
        assert (await c.get("/ready")).status_code == 200
        app.state.begin_drain()
        assert (await c.get("/ready")).status_code == 503
        assert (await c.get("/health")).status_code == 200
        r = await c.post("/v1/completions", json=OK_COMPLETION)
        assert_error(r, 503)


async def test_cors_preflight_is_answered_before_auth(srv):
    app = create_app(srv.engine, srv.family,
                     ServerSettings(api_key=KEY, cors_origins=["http://ui.example"]),
                     metrics=ServerMetrics.for_family(srv.family))
    async with client_for(app) as c:
        r = await c.options("/v1/chat/completions", headers={
            "Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://ui.example"
        r = await c.get("/v1/models", headers={"Origin": "http://ui.example"})
        assert r.status_code == 401  # CORS does not bypass the key
        assert r.headers["access-control-allow-origin"] == "http://ui.example"


@pytest.mark.parametrize("stream", [False, True])
async def test_disconnect_while_queued_frees_the_queue_slot(tiny_family, stream):
    engine = Engine(tiny_family, EngineConfig(max_batch_size=1, max_waiting=4))
    engine.start()
    app = create_app(engine, tiny_family, ServerSettings())
    long = {**OK_COMPLETION, "max_tokens": 300, "ignore_eos": True}
    try:
        running, stop_running, _ = asgi_call(app, "/v1/completions", long)
        await wait_until(lambda: engine.num_running == 1)
        queued, leave, _ = asgi_call(app, "/v1/completions", {**long, "stream": stream})
        await wait_until(lambda: engine.num_waiting == 1)
        leave.set()
        await asyncio.wait_for(queued, 5)
        await wait_until(lambda: engine.num_waiting == 0, timeout=1.0)
        assert engine.num_running == 1
        stop_running.set()
        await asyncio.wait_for(running, 5)
    finally:
        await engine.shutdown()
