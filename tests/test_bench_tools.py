"""The baseline comparison's parsing and ratios (unit level: the two-tree run is a benchmark,
not a test), and goodput's SLO accounting by hand and on a tiny run against a real server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.baseline import (
    BaselineError,
    compare,
    parse_engine_bench,
    repo_root,
    resolve_ref,
    round_order,
)
from loadtest.goodput import Slo, account, request_record, run_rate, summarize_sweep
from loadtest.stats import RequestResult
from server.process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]

# What `python -m loadtest.engine_bench` prints (the same at 2504a16 and now).
ENGINE_BENCH_OUTPUT = """\
command: python -m loadtest.engine_bench --config f.yaml --requests 16 --max-tokens 32
family: f.yaml; torch threads 1
16 requests x 32 tokens
  one after another:    179.9 output tokens/s
  all at once:         2221.1 output tokens/s
  ratio:                12.35x
where the concurrent run's step time goes:
  mean per step                7.03 ms   (32 steps)
  forward large-base           2.26 ms   32.1%
  combine                      0.07 ms    1.1%
  sample                       0.38 ms    5.4%
  other (python)               0.52 ms    7.4%
"""


# --- baseline ---------------------------------------------------------------------------------


def test_engine_bench_output_is_parsed() -> None:
    assert parse_engine_bench(ENGINE_BENCH_OUTPUT) == {
        "step_ms": 7.03,
        "combine_ms": 0.07,
        "tokens_per_s": 2221.1,
        "sequential_tokens_per_s": 179.9,
    }
    with pytest.raises(BaselineError, match="step_ms"):
        parse_engine_bench(ENGINE_BENCH_OUTPUT.replace("mean per step", "per step"))


def test_ratios_say_how_much_faster_the_new_engine_is() -> None:
    old = [{"step_ms": 10.0, "combine_ms": 1.0, "tokens_per_s": 100.0, "decode_step_ms": 8.0}] * 2
    old = old + [{"step_ms": 99.0, "combine_ms": 9.0, "tokens_per_s": 1.0,
                  "decode_step_ms": 80.0}]  # an outlier round  # fmt: skip
    new = [{"step_ms": 5.0, "combine_ms": 2.0, "tokens_per_s": 150.0, "decode_step_ms": 4.0}] * 3
    res = compare({"old": old, "new": new})
    assert res["old"]["step_ms"] == 10.0  # medians: the outlier does not count
    assert res["engine_step_vs_baseline"] == pytest.approx(2.0)  # half the step: 2x faster
    # The decode step's ratio is the median of each round's pair (old and new back to back).
    assert res["decode_step_ratios"] == [2.0, 2.0, 20.0]
    assert res["step_vs_baseline"] == pytest.approx(2.0)
    assert res["combine_vs_baseline"] == pytest.approx(0.5)  # combine got slower
    assert res["throughput_vs_baseline"] == pytest.approx(1.5)
    assert len(res["new"]["rounds"]) == 3
    # HTTP runs have no step time, only throughput
    http = compare({"old": [{"tokens_per_s": 200.0, "ttft_p50_ms": 100.0}],
                    "new": [{"tokens_per_s": 100.0, "ttft_p50_ms": 400.0}]})  # fmt: skip
    assert http["throughput_vs_baseline"] == pytest.approx(0.5)
    assert http["ttft_vs_baseline"] == pytest.approx(0.25)  # 4x the TTFT: 0.25x as fast
    assert "step_vs_baseline" not in http


def test_sides_alternate_abba() -> None:
    assert [s for i in range(4) for s in round_order(i)] == [
        "old", "new", "new", "old", "old", "new", "new", "old",
    ]  # fmt: skip


def test_baseline_ref_and_checkout_errors(tmp_path: Path) -> None:
    root = repo_root()
    assert (root / "loadtest" / "baseline.py").exists()
    assert len(resolve_ref(root, "HEAD")) == 40
    with pytest.raises(BaselineError, match="not a commit"):
        resolve_ref(root, "no-such-ref-anywhere")
    with pytest.raises(BaselineError, match="not inside a git checkout"):
        repo_root(tmp_path)


# --- goodput ----------------------------------------------------------------------------------


def _result(ttft: float, token_times: list[float], ok: bool = True) -> RequestResult:
    return RequestResult(
        start=0.0, ok=ok, ttft=ttft, token_times=token_times, output_tokens=len(token_times)
    )


def test_goodput_counts_requests_meeting_both_objectives() -> None:
    slo = Slo(ttft_ms=100, itl_ms=20)
    records = [
        request_record(r)
        for r in [
            _result(0.05, [0.05, 0.06, 0.07]),  # good: TTFT 50, mean ITL 10
            _result(0.15, [0.15, 0.16]),  # TTFT 150 misses
            _result(0.05, [0.05, 0.08, 0.11]),  # mean ITL 30 misses
            _result(0.10, [0.10]),  # one token: no gap to miss; TTFT on the line is met
            _result(0.01, [], ok=False),  # failed: misses both
        ]
    ]
    assert records[0]["mean_itl_ms"] == pytest.approx(10.0)
    assert records[3]["mean_itl_ms"] is None
    res = account(records, duration_s=2.0, slo=slo)
    assert (res["sent"], res["completed"], res["good"]) == (5, 4, 2)
    assert (res["ttft_met"], res["itl_met"]) == (3, 3)
    assert res["goodput"] == pytest.approx(1.0)  # 2 good in 2 s
    assert res["request_throughput"] == pytest.approx(2.0)
    assert res["attainment"] == pytest.approx(0.4)


def test_mean_itl_is_per_token_when_chunks_merge_tokens() -> None:
    # 5 tokens in 3 chunks over 80 ms after the first: 4 gaps of 20 ms on average
    r = RequestResult(start=0.0, ok=True, ttft=0.1, token_times=[0.1, 0.14, 0.18],
                      output_tokens=5)  # fmt: skip
    assert request_record(r)["mean_itl_ms"] == pytest.approx(20.0)


def test_sweep_reports_the_best_rate_and_distserve_rate() -> None:
    per_rate = [
        {"rate": 1.0, "goodput": 0.9, "attainment": 1.0},
        {"rate": 2.0, "goodput": 1.8, "attainment": 0.92},
        {"rate": 4.0, "goodput": 2.0, "attainment": 0.5},
    ]
    res = summarize_sweep(per_rate, Slo(200, 30), attainment=0.9)
    assert res["goodput"] == 2.0 and res["best_rate"] == 4.0
    assert res["max_rate_at_attainment"] == 2.0
    assert res["slo"] == {"ttft_ms": 200, "itl_ms": 30}


@pytest.fixture(scope="module")
def server(tiny_family_path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("log") / "server.log"
    with ServerProcess(
        tiny_family_path, "--max-batch-size", "8", "--threads", "1", log_path=log, ready_timeout=60
    ) as srv:
        yield srv.url


def test_goodput_of_a_tiny_real_run(server: str) -> None:
    loose = Slo(ttft_ms=1e6, itl_ms=1e6)
    res = asyncio.run(run_rate(server, 50.0, loose, requests=6, seed=0, duration=20,
                               timeout=20, tokens=(2, 6)))  # fmt: skip
    assert res["sent"] == res["completed"] == res["good"] == 6
    assert res["goodput"] == pytest.approx(6 / res["duration_s"])
    assert 0 < res["ttft_ms"]["p50"] <= res["ttft_ms"]["p99"]
    assert res["mean_itl_ms"]["p50"] > 0


def test_goodput_cli_json(server: str, tmp_path: Path) -> None:
    out = tmp_path / "g.json"
    cmd = [sys.executable, "-m", "loadtest.goodput", "--url", server, "--rates", "20,40",
           "--requests", "4", "--output-tokens", "2,4", "--ttft-slo-ms", "0.001",
           "--itl-slo-ms", "1000", "--duration", "20", "--timeout", "20",
           "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("command: python -m loadtest.goodput --url")
    assert "TTFT <= 0.001 ms and mean ITL <= 1000 ms" in proc.stdout
    data = json.loads(out.read_text())
    assert data["slo"] == {"ttft_ms": 0.001, "itl_ms": 1000.0}
    assert [r["rate"] for r in data["per_rate"]] == [20.0, 40.0]
    # no request gets its first token within a microsecond: every one completes, none is good
    assert all(r["completed"] == 4 and r["good"] == 0 for r in data["per_rate"])
    assert data["goodput"] == 0.0 and data["max_rate_at_attainment"] is None
