"""The load tool: its statistics by hand, its SSE client against a fake server, and the CLI
against a real eft-serve subprocess on a tiny random family."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from loadtest.client import LoadtestError, check_loopback, tokens_in_chunk
from loadtest.prompts import make_knobs
from loadtest.runner import LoadConfig, run_load
from loadtest.stats import RequestResult, describe_ms, percentile, summarize
from server.process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
STAT_KEYS = {"mean", "p50", "p90", "p99"}


# --- statistics by hand ---------------------------------------------------------------------


def test_percentile_matches_linear_interpolation() -> None:
    xs = [4.0, 1.0, 3.0, 2.0]  # sorted: 1 2 3 4
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == pytest.approx(2.5)  # pos 1.5
    assert percentile(xs, 90) == pytest.approx(3.7)  # pos 2.7 -> 3 + 0.7
    assert percentile(xs, 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) == 0.0


def test_itl_ttft_tpot_e2e_from_hand_made_timings() -> None:
    # Request A: sent at 10.0, tokens at 10.1, 10.3, 10.6, done 10.6 -> TTFT 100 ms,
    # ITLs 200 and 300 ms, e2e 600 ms, TPOT (600-100)/(3-1) = 250 ms.
    a = RequestResult(
        start=10.0,
        ok=True,
        status="200",
        ttft=0.1,
        e2e=0.6,
        itl=[0.2, 0.3],
        token_times=[10.1, 10.3, 10.6],
        output_tokens=3,
        prompt_tokens=5,
    )
    # Request B: TTFT 300 ms, one ITL of 100 ms, e2e 400 ms, TPOT 100 ms.
    b = RequestResult(
        start=10.0,
        ok=True,
        status="200",
        ttft=0.3,
        e2e=0.4,
        itl=[0.1],
        token_times=[10.3, 10.4],
        output_tokens=2,
        prompt_tokens=5,
    )
    bad = RequestResult(start=10.0, ok=False, status="429", error="queue full")
    s = summarize([a, b, bad], duration=2.0)
    assert s["completed"] == 2 and s["errors"] == 1
    assert s["errors_by_status"] == {"429": 1}
    assert s["total_output_tokens"] == 5
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_token_throughput"] == pytest.approx(2.5)
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(200.0)
    # ITLs pooled over requests (vLLM): 100, 200, 300 ms.
    assert s["itl_ms"]["mean"] == pytest.approx(200.0)
    assert s["itl_ms"]["p50"] == pytest.approx(200.0)
    assert s["itl_ms"]["p90"] == pytest.approx(280.0)
    assert s["itl_ms"]["p99"] == pytest.approx(298.0)
    assert s["tpot_ms"]["mean"] == pytest.approx(175.0)
    assert s["e2e_ms"]["p99"] == pytest.approx(400 + 0.99 * 200)
    assert describe_ms([]) == {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}


def test_token_chunk_classification() -> None:
    assert tokens_in_chunk({"choices": [{"text": "hi", "finish_reason": None}]}, chat=False)
    # a token whose bytes are not a whole character yet streams as empty text
    assert tokens_in_chunk({"choices": [{"text": "", "finish_reason": None}]}, chat=False)
    assert not tokens_in_chunk({"choices": [{"text": "", "finish_reason": "length"}]}, chat=False)
    assert not tokens_in_chunk({"choices": [], "usage": {"completion_tokens": 3}}, chat=False)
    role = {"choices": [{"delta": {"role": "assistant", "content": ""}}]}
    assert not tokens_in_chunk(role, chat=True)
    assert tokens_in_chunk({"choices": [{"delta": {"content": "x"}}]}, chat=True)
    assert not tokens_in_chunk({"choices": [{"delta": {}, "finish_reason": "stop"}]}, chat=True)
    # with logprobs the server lists each token: a merged chunk counts for all of them
    merged = {"choices": [{"text": "é", "logprobs": {"tokens": ["\\xc3", "\\xa9"]}}]}
    assert tokens_in_chunk(merged, chat=False) == 2
    chat_lp = {"choices": [{"delta": {}, "logprobs": {"content": [{"token": "a"}]}}]}
    assert tokens_in_chunk(chat_lp, chat=True) == 1


def test_loopback_guard() -> None:
    check_loopback("http://127.0.0.1:8000")
    check_loopback("http://localhost:8000/v1")
    check_loopback("http://[::1]:8000")
    with pytest.raises(LoadtestError, match="allow-remote"):
        check_loopback("http://10.1.2.3:8000")


def test_mixed_knobs_interpolate() -> None:
    knobs = make_knobs(50, "mixed", seed=3, fixed=None)
    assert all(k["helpful"] + k["harmless"] == pytest.approx(1.0) for k in knobs)
    assert len({k["helpful"] for k in knobs}) > 10
    assert make_knobs(2, "fixed", 0, None) == [None, None]


# --- the client against a fake OpenAI server ------------------------------------------------


def _fake_openai(status_for: dict[int, int]) -> httpx.MockTransport:
    """Streams `max_tokens` one-token chunks, a finish chunk, a usage chunk and [DONE].
    The n-th completion request gets the HTTP status `status_for.get(n, 200)`."""
    counter = {"n": 0}

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake"}, {"id": "fake/x"}]})
        if request.url.path == "/tokenize":
            n = len(json.loads(request.content)["prompt"].split())
            return httpx.Response(200, json={"tokens": list(range(2 * n)), "count": 2 * n})
        body = json.loads(request.content)
        assert body["stream"] and body["ignore_eos"] and body["stream_options"]["include_usage"]
        counter["n"] += 1
        status = status_for.get(counter["n"], 200)
        if status != 200:
            return httpx.Response(
                status,
                json={"error": {"message": "busy", "type": "x", "param": None, "code": status}},
            )
        k = body["max_tokens"]

        async def stream():
            for i in range(k):
                await asyncio.sleep(0.002)
                chunk = {"choices": [{"index": 0, "text": f"t{i}", "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            fin = {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
            yield f"data: {json.dumps(fin)}\n\n".encode()
            usage = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": k}}
            yield f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode()

        return httpx.Response(200, content=stream(), headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handler)


@pytest.mark.parametrize("rate", [None, 200.0])
def test_runner_against_fake_server(rate: float | None) -> None:
    cfg = LoadConfig(
        url="http://127.0.0.1:1",
        concurrency=3,
        rate=rate,
        requests=8,
        max_tokens=5,
        prompt_len=10,
        knobs="mixed",
        progress=False,
    )
    run = asyncio.run(run_load(cfg, transport=_fake_openai({2: 429})))
    s = run.summary()
    assert run.model == "fake"
    assert run.tok_per_word == pytest.approx(2.0)
    assert s["completed"] == 7 and s["errors"] == 1 and s["errors_by_status"] == {"429": 1}
    assert s["total_output_tokens"] == 35 and s["total_prompt_tokens"] == 49
    assert all(len(r.itl) == 4 for r in run.results if r.ok)  # the finish chunk is no token
    assert 0 < s["ttft_ms"]["p50"] <= s["e2e_ms"]["p50"]
    assert s["itl_ms"]["p50"] > 0


# --- the CLI against a real eft-serve ---------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_family_path, tmp_path_factory: pytest.TempPathFactory):
    """A real `eft-serve` on the tiny random family, on a free loopback port."""
    log = tmp_path_factory.mktemp("log") / "server.log"
    # tiny models: one thread is faster, and kinder to a shared machine
    with ServerProcess(
        tiny_family_path, "--max-batch-size", "8", "--threads", "1", log_path=log, ready_timeout=60
    ) as srv:
        yield srv.url


@pytest.mark.parametrize("knobs", ["fixed", "mixed"])
def test_cli_against_real_server(server: str, knobs: str, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    cmd = [
        sys.executable,
        "-m",
        "loadtest",
        "--url",
        server,
        "--concurrency",
        "3",
        "--requests",
        "6",
        "--max-tokens",
        "5",
        "--prompt-len",
        "8",
        "--knobs",
        knobs,
        "--json",
        str(out),
        "--duration",
        "60",
        "--timeout",
        "30",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Output token throughput" in proc.stdout
    data = json.loads(out.read_text())
    assert data["completed"] == 6 and data["errors"] == 0, data
    assert data["total_output_tokens"] == 30  # ignore_eos: exactly max_tokens each
    assert data["request_throughput"] > 0 and data["output_token_throughput"] > 0
    for key in ("ttft_ms", "itl_ms", "e2e_ms"):
        stats = data[key]
        assert set(stats) >= STAT_KEYS
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"], (key, stats)
    assert data["ttft_ms"]["p50"] <= data["e2e_ms"]["p99"]
    assert data["config"]["model"] == "tiny"


def test_cli_refuses_remote_url() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest",
            "--url",
            "http://192.0.2.1:8000",
            "--concurrency",
            "1",
            "--requests",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "allow-remote" in proc.stderr


def test_output_lengths_range() -> None:
    from loadtest.runner import output_lengths

    assert output_lengths(5, 16, 0.0, seed=0) == [16] * 5
    lengths = output_lengths(200, 16, 0.5, seed=0)
    assert min(lengths) >= 8 and max(lengths) <= 24 and len(set(lengths)) > 5


def _fake_run(tok_per_s: float, itl_ms: float) -> object:
    """A LoadRun of one second whose single request streamed `tok_per_s` tokens."""
    from loadtest.runner import LoadRun

    n = int(tok_per_s)
    r = RequestResult(
        start=0.0,
        ok=True,
        status="200",
        ttft=0.01,
        e2e=1.0,
        itl=[itl_ms / 1000] * (n - 1),
        token_times=[0.5] * n,
        output_tokens=n,
        chunks=n,
    )
    return LoadRun(LoadConfig(concurrency=1), [r], 0.0, 1.0, "m", 1.0)


def test_bench_compose_keys_and_ratios() -> None:
    from loadtest.bench_results import compose, format_markdown, format_table
    from loadtest.naive import NaiveResult

    levels = (1, 4, 16)
    runs = {f"eft_c{c}": _fake_run(10.0 * c, 20.0) for c in levels}
    runs |= {
        "base_c16": _fake_run(200.0, 10.0),
        "base_c16_r1": _fake_run(190.0, 10.0),
        "eft_c16_r1": _fake_run(150.0, 20.0),
        "eft_mixed_c16": _fake_run(120.0, 25.0),
    }
    kv = {"large-base": 0.0, "small-base": 0.0}
    srv = {
        "runs": runs,
        "forward_from_metrics": {
            "large-base": (0.08, 5),
            "small-base": (0.01, 5),
            "helpful": (0.01, 5),
        },
        "rss_idle_bytes": 100,
        "kv_bytes_start": kv,
        "kv_bytes_idle": kv,
        "kv_bytes_idle_after_rss": kv,
        "rss_after_100": 1000,
        "rss_after_1000": 1010,
        "rss_requests": 1000,
        "peak_rss_bytes": {"eft_c16": 2000},
        "kv_bytes_at_peak": {"eft_c16": {"large-base": 64.0}},
        "loadavg": {"eft_c16": 1.0},
    }
    naive = [NaiveResult(2, 40, 2.0, ["large-base", "small-base", "helpful"])]
    costs = {"large-base": 0.08, "small-base": 0.01, "helpful": 0.01, "harmless": 0.01}
    costs_b1 = {"large-base": 0.02, "small-base": 0.005, "helpful": 0.005, "harmless": 0.005}
    res = compose(naive, costs, srv, levels, costs_b1)
    assert "batching_limit" not in res and "vs_static_batch" not in res  # not measured
    # the issue-9 measurements: engine step times, the static-batch run, the Poisson run
    runs["eft_workload_c16"] = _fake_run(90.0, 20.0)
    runs["eft_poisson_c16"] = _fake_run(80.0, 30.0)
    static = NaiveResult(48, 30, 1.0, ["large-base", "small-base", "helpful"])
    res = compose(
        naive,
        costs,
        srv,
        levels,
        costs_b1,
        engine_step_seconds={1: 0.01, 16: 0.04},
        static=static,
        workload_lengths=[4, 1, 1, 1] * 8,
    )
    assert res["batching_limit"] == pytest.approx(16 * 0.01 / 0.04)
    assert res["batching_efficiency"] == pytest.approx(8.0 / 4.0)
    assert res["vs_static_batch"] == pytest.approx(90.0 / 30.0)
    # static: 4 + 4 steps; closed loop: the last 4-token request finds its slot at step 2
    assert res["vs_static_batch_equal_step_cost"] == pytest.approx(8 / 6)
    assert res["itl_p99_over_p50_poisson"] == pytest.approx(1.0)
    assert res["targets"]["vs_static_batch"]["met"]
    assert res["targets"]["itl_p99_over_p50_poisson"]["met"]
    assert res["batching_ceiling_c16"] == pytest.approx(16 * 0.03 / 0.1)
    assert res["batched_vs_sequential"] == pytest.approx(160.0 / 20.0)  # best EFT c=16 run
    assert res["eft_vs_base"] == pytest.approx(160.0 / 200.0)  # best of each kind
    assert res["ideal_ratio"] == pytest.approx(0.8)  # harmless (weight 0) is not run
    assert res["eft_vs_ideal"] == pytest.approx(1.0)
    assert res["eft_vs_ideal_from_metrics"] == pytest.approx(1.0)
    assert set(res["scaling"]) == {"1", "4", "16"}
    assert res["scaling"]["16"]["itl_p50_ms"] == pytest.approx(20.0)
    assert res["rss_growth"] == pytest.approx(1.01)
    assert res["targets"]["batched_vs_sequential"]["met"]
    assert res["targets"]["eft_vs_ideal"]["met"]
    res.update(
        plan="test",
        command="cmd",
        bench_seconds=1.0,
        machine={"label": "2-core CPU"},
        family={"summary": "tiny"},
    )
    res.update(
        spec_speedup_b1=1.4, spec_speedup_b1_temperature_1=1.3, spec_acceptance=0.67,
        spec_speedup_c16=0.97, adapters={"adapters": 2, "rank": 16}, adapter_step_ratio_b1=1.47,
        adapter_step_ratio_b16=1.23, adapter_forward_ratio_b1=1.71, adapter_forward_ratio_b16=1.56,
        structured_overhead=0.955,
    )  # fmt: skip
    table = format_table(res)
    assert "batched_vs_sequential" in table and "reproduce: cmd" in table
    assert "spec_speedup_b1" in table and "1.40x" in table
    assert "adapter_forward_ratio_b16" in table and "1.56x" in table
    assert "structured_overhead" in table and "0.955x" in table
    for key in ("batching_limit", "batching_efficiency", "vs_static_batch", "poisson"):
        assert key in table, key
    assert "vs_static_batch" in format_markdown(res)


def test_static_vs_continuous_steps_by_hand() -> None:
    from loadtest.bench_results import static_vs_continuous_steps

    # batches [4, 1] and [1, 1]: 4 + 1 steps; two slots: one runs the 4, the other the three 1s
    assert static_vs_continuous_steps([4, 1, 1, 1], 2) == (5, 4)
    assert static_vs_continuous_steps([3, 3, 3, 3], 2) == (6, 6)


def test_mixed_workload_is_seeded_and_in_range() -> None:
    from loadtest.prompts import mixed_workload

    work = mixed_workload(48, seed=0)
    assert work == mixed_workload(48, seed=0) != mixed_workload(48, seed=1)
    words = [len(p.split()) for p, _ in work]
    lengths = [k for _, k in work]
    assert len(work) == 48 and 4 <= min(words) and max(words) <= 60
    assert 8 <= min(lengths) and max(lengths) <= 128 and len(set(lengths)) > 20
    # log-uniform: about half the requests ask for at most 32 tokens (the geometric midpoint)
    assert 12 <= sum(k <= 32 for k in lengths) <= 36


@pytest.mark.parametrize("rate", [None, 500.0])
def test_runner_sends_an_explicit_workload(rate: float | None) -> None:
    work = [("a b c", 3), ("d e", 5), ("f", 1)]
    cfg = LoadConfig(url="http://127.0.0.1:1", concurrency=2, rate=rate, workload=work,
                     requests=99, max_tokens=64, progress=False)  # fmt: skip
    run = asyncio.run(run_load(cfg, transport=_fake_openai({})))
    s = run.summary()
    assert s["completed"] == 3 and s["total_output_tokens"] == 9
    assert sorted(r.output_tokens for r in run.results) == [1, 3, 5]
    assert s["config"]["workload"] == "3 explicit requests"


def test_static_batch_left_padding_matches_each_row_alone(tiny_family, one_torch_thread) -> None:
    from loadtest.naive import eft_coeffs, static_batch

    coeffs = eft_coeffs(tiny_family, {"helpful": 1.0})
    tok = tiny_family.tokenizer
    prompts = [tok.encode(t) for t in ("the river", "north of the capital city was founded", "a")]
    assert len({len(p) for p in prompts}) == 3
    together = static_batch(tiny_family, coeffs, prompts, 6)
    assert together.shape == (3, 6)
    for row, p in zip(together.tolist(), prompts, strict=True):
        assert row == static_batch(tiny_family, coeffs, [p], 6)[0].tolist()


def test_engine_decode_step_seconds_per_batch_size(tiny_family, one_torch_thread) -> None:
    from loadtest.engine_bench import decode_step_seconds

    prompts = [tiny_family.tokenizer.encode("the river city")]
    steps = decode_step_seconds(tiny_family, {"helpful": 1.0}, prompts, 4, (1, 3), rounds=1)
    assert set(steps) == {1, 3} and all(0 < v < 5 for v in steps.values())


def test_adapter_bench_times_adapters_against_merged_models(
    tiny_family_path, one_torch_thread
) -> None:
    from loadtest.adapter_bench import compare

    res = compare(tiny_family_path, adapters=2, rank=4, max_tokens=3, rounds=1)
    for key in ("step_seconds_adapters", "step_seconds_merged"):
        assert set(res[key]) == {1, 16} and all(0 < v < 5 for v in res[key].values())
    assert res["ratio_b16"] == res["step_seconds_merged"][16] / res["step_seconds_adapters"][16]


def test_spec_bench_times_both_sides_of_one_engine(tiny_family, one_torch_thread) -> None:
    from loadtest.spec_bench import compare

    prompts = [[{"role": "user", "content": q}] for q in ("the river city", "north", "salt")]
    greedy = compare(tiny_family, prompts, "2", 0.0, False, max_tokens=6, reps=1)
    assert greedy["identical_greedy_output"] is True
    assert greedy["drafted_tokens"]["spec"] > 0 and greedy["drafted_tokens"]["off"] == 0
    assert greedy["off_tok_s"] > 0 and greedy["spec_tok_s"] > 0
    assert greedy["ratio"] == greedy["spec_tok_s"] / greedy["off_tok_s"]
    assert 0 <= greedy["acceptance"] <= 1 and 0 < greedy["prefill_share"] < 1
    sampled = compare(tiny_family, prompts, "auto", 1.0, True, max_tokens=6, reps=2)
    assert "identical_greedy_output" not in sampled and sampled["forward_ratio"] > 0


def test_a_deepened_base_computes_the_same_function_at_a_higher_cost(
    tiny_family_path, tmp_path, one_torch_thread
) -> None:
    import torch
    import yaml

    from decoding.family import load_family
    from loadtest.spec_bench import deepen_base

    path = deepen_base(tiny_family_path, 5, tmp_path)
    cfg = yaml.safe_load(path.read_text())
    assert cfg["models"]["large-base"]["path"] == str(tmp_path / "deep-base")
    assert Path(cfg["models"]["helpful"]["path"]) == Path(tiny_family_path).parent / "helpful"
    deep = load_family(path).models["large-base"].module
    base = load_family(tiny_family_path).models["large-base"].module
    assert deep.config.num_hidden_layers == 5 > base.config.num_hidden_layers
    ids = torch.tensor([[1, 5, 9, 33, 70, 2, 8]])
    with torch.inference_mode():
        assert torch.equal(deep(ids).logits, base(ids).logits)
