"""Server pieces that need no engine: token bytes, request models, knob names, metric labels."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server import protocol as P
from server.errors import from_validation_error
from server.knobs import model_ids, normalise_knobs, resolve_model
from server.metrics import FAILURE_REASONS, ServerMetrics
from server.tokens import TokenText


@pytest.mark.parametrize("text", ["café 東京 😀 smörgåsbord", "the river", "über naïve 数据 🚀"])
def test_token_bytes_rebuild_the_utf8_text(tiny_family, text):
    tok = tiny_family.tokenizer
    tt = TokenText(tok)
    ids = tok.encode(text, add_special_tokens=False)
    assert b"".join(bytes(tt.bytes(i)) for i in ids) == text.encode()
    for i in ids:
        s, raw = tt.get(i)
        # a token holding part of a character is shown as its bytes, never as U+FFFD
        assert "\ufffd" not in s
        assert s.startswith("bytes:") or s == raw.decode()


def test_special_tokens_have_their_text(tiny_family):
    tt = TokenText(tiny_family.tokenizer)
    assert tt.text(tiny_family.tokenizer.eos_token_id) == "</s>"


def test_knob_normalisation_and_model_ids(tiny_family):
    assert model_ids(tiny_family)[0] == "tiny"
    assert resolve_model(tiny_family, "tiny") is None
    assert resolve_model(tiny_family, "tiny/helpful") == "helpful"
    out = normalise_knobs(tiny_family, {"helpfulness": 1.0, "harmlessness": 0.5,
                                        "base_top_p": 1.0, "plausibility": 0.0}, False)
    assert out == {"helpful": 1.0, "harmless": 0.5, "base_top_p": 1.0, "plausibility": 0.0}
    assert normalise_knobs(tiny_family, {"helpful": -1.0}, True) == {"helpful": -1.0}


def test_request_models_are_lenient_but_strict_on_known_fields():
    r = P.CompletionRequest.model_validate({"model": "m", "prompt": "x", "future_field": 1})
    assert r.max_tokens == 16 and not r.stop and r.model_extra == {"future_field": 1}
    assert P.CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2], [3]]}).prompt \
        == [[1, 2], [3]]
    assert P.CompletionRequest.model_validate({"model": "m", "prompt": [1, 2]}).prompt == [1, 2]
    with pytest.raises(ValidationError) as e:
        P.ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "x"}],
             "eft": {"helpful": float("inf")}})
    err = from_validation_error(e.value)
    assert (err.status, err.param) == (400, "eft.helpful")
    chat = P.ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
         "max_completion_tokens": 5})
    assert chat.max_tokens_asked == 5


def test_metrics_label_sets_are_initialised_and_bounded():
    m = ServerMetrics(["big", "small"], ["small"])
    names = {(s.name, tuple(sorted(s.labels.items())))
             for fam in m.registry.collect() for s in fam.samples}
    for reason in FAILURE_REASONS:
        assert ("eft_request_failure_total", (("reason", reason),)) in names
    m.failure("something-new")  # unknown reasons fold into "error", never a new series
    assert m.registry.get_sample_value("eft_request_failure_total", {"reason": "error"}) == 1
    from decoding.request import StepStats

    m.on_step(StepStats(batch_size=3, num_running=1, num_waiting=0, generated_tokens=3,
                        forward_seconds={"big": 0.001, "intruder": 1.0},
                        kv_cache_tokens={"big": 10}))
    assert m.registry.get_sample_value("eft_generation_tokens_total") == 3
    assert m.registry.get_sample_value("eft_model_forward_seconds_count",
                                       {"model": "intruder"}) is None


def test_a_stream_closed_after_its_content_ended_logs_no_task_error():
    """The client goes while the stream waits at a ping and its content has just ended: the
    finished read-ahead task's StopAsyncIteration is collected, not logged by asyncio at ERROR
    ("Task exception was never retrieved"), which would trip alerting on every such disconnect."""
    import asyncio
    import gc

    from server.streaming import PING, with_pings

    async def content():
        await asyncio.sleep(0.05)
        return
        yield  # an async generator that ends without an item

    async def go() -> list:
        errors: list = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        stream = with_pings(content(), interval=0.01)
        assert await anext(stream) == PING
        await asyncio.sleep(0.1)  # the content ends meanwhile
        await stream.aclose()
        gc.collect()
        await asyncio.sleep(0)
        return errors

    assert asyncio.run(go()) == []
