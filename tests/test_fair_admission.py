"""Admission: the waiting queue counts sequences, caps one request's share, and takes turns
between clients and between requests (decoding.fair_queue)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from decoding.composition import make_composition
from decoding.engine import Engine, EngineConfig
from decoding.request import (
    GenerationRequest,
    QueueFullError,
    RequestValidationError,
    SamplingParams,
)
from server.app import ServerSettings


def request(family, rid, client=None, max_tokens=2, n=1):
    ids = family.tokenizer.encode("the river")
    comp = make_composition(family, None, None)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, n=n)
    return GenerationRequest(rid, {m: ids for m in family.models}, comp, params, client=client)


async def finish_order(engine, units):
    """Submit every unit (a list of requests) while the engine is held, then let it run one
    row at a time; returns the request ids in the order they finished."""
    order: list[str] = []

    async def drain(rid, stream):
        async for ev in stream:
            if ev.finish_reason is not None:
                order.append(rid)

    start, engine.start = engine.start, lambda: None
    tasks = []
    for unit in units:
        streams = engine.submit_all(unit)
        tasks += [asyncio.ensure_future(drain(r.request_id, s)) for r, s in zip(unit, streams)]
    engine.start = start
    engine.start()
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
    finally:
        await engine.shutdown()
    return order


def test_one_large_request_does_not_hold_back_a_later_one(tiny_family):
    async def go():
        engine = Engine(tiny_family, EngineConfig(max_batch_size=1, max_waiting=16))
        big = [request(tiny_family, f"big-{i}") for i in range(6)]
        return await finish_order(engine, [big, [request(tiny_family, "small")]])

    order = asyncio.run(go())
    # Round-robin over requests: the small one is served right after the big one's first
    # prompt (a FIFO would serve it last), and the big one keeps its own prompt order.
    assert order.index("small") == 1, order
    assert [r for r in order if r != "small"] == [f"big-{i}" for i in range(6)]


def test_many_small_requests_of_one_client_do_not_hold_back_another_client(tiny_family):
    async def go():
        engine = Engine(tiny_family, EngineConfig(max_batch_size=1, max_waiting=16))
        flood = [[request(tiny_family, f"a-{i}", client="10.0.0.1")] for i in range(5)]
        other = [[request(tiny_family, "b", client="10.0.0.2")]]
        return await finish_order(engine, flood + other)

    order = asyncio.run(go())
    assert order.index("b") == 1, order
    assert [r for r in order if r != "b"] == [f"a-{i}" for i in range(5)]


def test_queue_counts_sequences_and_one_request_may_hold_a_share(tiny_family):
    async def go():
        cfg = EngineConfig(max_batch_size=1, max_waiting=4, max_seqs_per_request=3)
        engine = Engine(tiny_family, cfg)
        engine.start = lambda: None  # nothing drains: the counts below are exact
        with pytest.raises(RequestValidationError, match=r"4 sequences.*--max-seqs-per-request"):
            engine.submit_all([request(tiny_family, f"x{i}") for i in range(4)])
        with pytest.raises(RequestValidationError, match="--max-seqs-per-request"):
            engine.submit(request(tiny_family, "n4", n=4))  # n counts as much as prompts
        engine.submit_all([request(tiny_family, f"a{i}") for i in range(3)])
        assert engine.num_waiting == 3
        with pytest.raises(QueueFullError, match=r"holds 3 of 4 sequences \(--max-waiting\)"):
            engine.submit_all([request(tiny_family, f"b{i}") for i in range(2)])
        engine.submit(request(tiny_family, "c"))  # the last place is left for someone else
        assert engine.num_waiting == 4

    asyncio.run(go())


@pytest.mark.anyio
async def test_three_large_requests_leave_room_for_a_fourth_client(tiny_family, serve_app,
                                                                   one_torch_thread):
    # The case: three copies of 64 one-token prompts used to fill a 128-request queue
    # (counted per request, checked once per request) and lock every other client out; in
    # FIFO order a later request also waited for all 192 prompts ahead of it.
    cfg = dataclasses.replace(EngineConfig(), max_batch_size=16, max_waiting=256)
    async with serve_app(tiny_family, cfg, ServerSettings()) as s:

        def finished() -> float:
            return s.metrics.registry.get_sample_value(
                "eft_request_success_total", {"finished_reason": "length"}) or 0.0

        big = {"model": "tiny", "prompt": [[5]] * 64, "max_tokens": 8, "ignore_eos": True}
        copies = [asyncio.ensure_future(s.client.post("/v1/completions", json=big))
                  for _ in range(3)]
        deadline = time.monotonic() + 30
        while s.engine.num_waiting < 150:  # most of the 192 sequences queued
            assert time.monotonic() < deadline, s.engine.num_waiting
            await asyncio.sleep(0.005)
        before = finished()
        r = await s.client.post("/v1/completions", json={
            "model": "tiny", "prompt": "hello", "max_tokens": 2, "ignore_eos": True})
        assert r.status_code == 200, r.text
        ahead = finished() - before - 1  # the copies' sequences finished before the fourth's
        results = await asyncio.gather(*copies)
        assert [x.status_code for x in results] == [200, 200, 200]
        # Taking turns, the fourth is admitted within a round of the copies' prompts; in FIFO
        # order at least 150 - 16 of theirs would have finished first.
        assert ahead < 96, ahead
        # A fourth copy would still fit; a request over the share is refused up front.
        r = await s.client.post("/v1/completions", json={**big, "n": 2})
        assert r.status_code == 400
        assert "--max-seqs-per-request" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "too_many_sequences"
