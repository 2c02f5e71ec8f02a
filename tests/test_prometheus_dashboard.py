"""Every Grafana panel shows data from a real server, through a real Prometheus.

A real `eft-serve` subprocess serves a tiny random family on a free loopback port; Debian's
`prometheus` binary scrapes it every second (with the shipped alert rules loaded); a little
traffic goes through with several knob settings, a stream, a chat and a bad request. Then each
PromQL query of deploy/grafana/dashboards/eft-serve.json runs through Prometheus's HTTP API with
the template variables resolved as Grafana would, and must return a finite value. Panels whose
feature is off are named in FEATURE_OFF and must stay empty, so a test failure says when one
turns on.

Needs the `prometheus` binary (Debian: apt-get install -y prometheus); skipped without it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from server.process import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy/grafana/dashboards/eft-serve.json"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
PROMETHEUS = shutil.which("prometheus")

# Panel title -> why it has no data in this test. (The server below runs the `auto` speculative
# policy, which tries speculation first and plain decoding next at each batch size, so the
# speculative panels have their counters and the measured speed-up too.)
FEATURE_OFF: dict[str, str] = {}


def builtins(window: str) -> dict[str, str]:
    """What Grafana substitutes for its built-in interval variables. `window` reaches back to
    before the first scrape, so every rate() holds a sample from before the traffic and one
    from after it, however slowly a busy machine ran the traffic (a scrape that times out
    meanwhile leaves a gap, not a wrong value)."""
    return {"__rate_interval": window, "__range": window, "__interval": "1s"}

KNOB_SETTINGS = [
    {"helpful": 0.5, "harmless": 0.5},
    {"helpful": 1.0},
    {"harmless": 1.0},
    {"helpful": 0.0, "harmless": 0.0},  # the plain large base
    None,  # the family's defaults
]

pytestmark = [
    pytest.mark.skipif(PROMETHEUS is None,
                       reason="the prometheus binary is absent (apt-get install -y prometheus)"),
    pytest.mark.timeout(120),
]


@contextmanager
def running(cmd: list[str], log: Path):
    """A subprocess in its own session, logging to `log`; stopped (then killed) on exit."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)


def tail(log: Path, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


def wait_for(what: str, check, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll `check()` until it is true; fail early, with the log, if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what}: the process exited ({proc.returncode}):\n{tail(log)}")
        try:
            if check():
                return
        except (httpx.HTTPError, KeyError, IndexError, ValueError):
            pass
        time.sleep(0.25)
    pytest.fail(f"{what}: not within {timeout:.0f} s:\n{tail(log)}")


class Prom:
    """The few Prometheus HTTP API calls the test needs."""

    def __init__(self, url: str):
        self.http = httpx.Client(base_url=url, timeout=10)
        self.at: float | None = None  # evaluation time; None: now

    def query(self, expr: str) -> list[dict]:
        at = self.at if self.at is not None else time.time()
        r = self.http.post("/api/v1/query", data={"query": expr, "time": f"{at:.3f}"})
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]["result"]

    def label_values(self, metric: str, label: str) -> list[str]:
        r = self.http.get(f"/api/v1/label/{label}/values", params={"match[]": metric})
        return r.json()["data"]

    def rules(self) -> list[dict]:
        groups = self.http.get("/api/v1/rules").json()["data"]["groups"]
        return [rule for g in groups for rule in g["rules"]]


def finite_values(result: list[dict]) -> list[float]:
    vals = [float(s["value"][1]) for s in result if "value" in s]
    return [v for v in vals if math.isfinite(v)]


def grafana_regex(values: list[str]) -> str:
    """A multi-value variable with "All" selected, as Grafana writes it into a =~ matcher:
    each value regex-escaped, joined as (a|b), backslashes doubled inside the PromQL string."""
    escaped = [re.escape(v).replace("\\", "\\\\") for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def substitute(expr: str, variables: dict[str, str]) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        assert name in variables, f"unknown template variable ${name} in {expr}"
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, expr)


def panels_and_exprs(dash: dict) -> list[tuple[str, str]]:
    out = []
    for panel in dash["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            out.extend((p["title"], t["expr"]) for t in p.get("targets", []))
    return out


def send_traffic(base: str, family: str) -> None:
    """A few requests of each kind; every one must succeed except the deliberate 400."""
    with httpx.Client(base_url=base, timeout=60) as client:
        def complete(i: int, knobs: dict | None) -> None:
            body = {"model": family, "prompt": "the river city", "max_tokens": 6,
                    "temperature": 0.8, "seed": i}
            if knobs is not None:
                body["eft"] = knobs
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text

        # concurrently, so the engine batches rows with different knobs in one step;
        # result() re-raises a failed request's assertion here
        with ThreadPoolExecutor(len(KNOB_SETTINGS)) as pool:
            for f in [pool.submit(complete, i, k) for i, k in enumerate(KNOB_SETTINGS)]:
                f.result()
        r = client.post("/v1/completions", json={"model": f"{family}/helpful",
                                                 "prompt": "who founded", "max_tokens": 4})
        assert r.status_code == 200, r.text
        r = client.post("/v1/chat/completions", json={
            "model": family, "max_tokens": 4, "eft": {"helpful": 0.7, "harmless": 0.3},
            "messages": [{"role": "user", "content": "what is the capital"}]})
        assert r.status_code == 200, r.text
        with client.stream("POST", "/v1/completions", json={
                "model": family, "prompt": "north and south", "max_tokens": 6, "stream": True,
                "stream_options": {"include_usage": True},
                "eft": {"helpful": 0.3, "harmless": 0.7}}) as r:
            assert r.status_code == 200
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and len(lines) > 2
        r = client.post("/v1/completions", json={"model": family, "prompt": "x",
                                                 "max_tokens": 2, "eft": {"nosuch": 1.0}})
        assert r.status_code == 400, r.text
        # Alone and long enough for the auto policy to time a speculative and a plain step.
        r = client.post("/v1/completions", json={
            "model": family, "prompt": "the king of salt", "max_tokens": 16, "temperature": 0,
            "ignore_eos": True, "eft": {"helpful": 1.0}})
        assert r.status_code == 200, r.text


def test_every_dashboard_panel_returns_data(tiny_family_path, tmp_path):
    family = yaml.safe_load(Path(tiny_family_path).read_text())["name"]
    prom_port = free_port()
    prom_log = tmp_path / "prometheus.log"
    server = ServerProcess(tiny_family_path, "--threads", "1", "--speculative", "auto",
                           log_path=tmp_path / "eft-serve.log",
                           ready_timeout=50)
    port, base = server.port, server.url
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        # the shipped alert rules, to see that each evaluates against the real series
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "eft-serve",
                            "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
    }))
    started = time.time()
    with ExitStack() as stack:
        stack.enter_context(server)  # returns once /ready answers
        prom_proc = stack.enter_context(running(
            [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"], prom_log))
        prom = Prom(f"http://127.0.0.1:{prom_port}")
        wait_for("prometheus ready", lambda: prom.http.get("/-/ready").status_code == 200,
                 prom_proc, prom_log, timeout=20)
        # One scrape before any traffic, so every counter has a zero to rate() from.
        wait_for("a first scrape", lambda: finite_values(prom.query('up{job="eft-serve"} == 1')),
                 prom_proc, prom_log, timeout=10)

        send_traffic(base, family)
        done = time.time()
        # ...and a successful one that starts after the last response, so it holds all the
        # traffic. Every query below is evaluated at that scrape's time: a later scrape that
        # times out on a busy machine would mark the series stale and blank the panels.
        def scrape_after_traffic() -> float | None:
            (series,) = prom.query(f'up{{job="eft-serve"}}[{math.ceil(time.time() - done) + 2}s]')
            stamps = [float(t) for t, v in series["values"] if v == "1" and float(t) > done + 0.2]
            return min(stamps, default=None)

        wait_for("a scrape after the traffic", lambda: scrape_after_traffic() is not None,
                 prom_proc, prom_log, timeout=15)
        prom.at = scrape_after_traffic() + 0.5
        window = f"{math.ceil(time.time() - started) + 5}s"
        dash = json.loads(DASHBOARD.read_text())
        variables = builtins(window)
        for var in dash["templating"]["list"]:
            if var["type"] == "datasource":
                variables[var["name"]] = var["current"]["value"]
                continue
            metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"]).groups()
            values = prom.label_values(metric, label)
            assert values, f"variable ${var['name']} ({var['query']}) resolves to nothing"
            variables[var["name"]] = grafana_regex(values)

        problems, results = [], {}
        for title, expr in panels_and_exprs(dash):
            query = substitute(expr, variables)
            try:
                values = finite_values(prom.query(query))
            except AssertionError as e:
                problems.append(f"{title}: query rejected: {e}\n    {query}")
                continue
            results.setdefault(title, []).append(values)
            if title in FEATURE_OFF:
                if values:
                    problems.append(f"{title}: returns data now, but FEATURE_OFF says "
                                    f"'{FEATURE_OFF[title]}': drop it from FEATURE_OFF")
            elif not values:
                problems.append(f"{title}: no data\n    {query}")
        assert set(FEATURE_OFF) <= set(results), "FEATURE_OFF names a panel that is gone"
        assert not problems, "\n".join(problems)

        # Beyond "some data": the traffic above shows up where it should.
        by_expert = {s["metric"]["expert"]: float(s["value"][1]) for s in prom.query(
            f"sum by (expert) (increase(eft_knob_requests_total[{window}]))")}
        assert by_expert["helpful"] > 0 and by_expert["harmless"] > 0, by_expert
        by_reason = {s["metric"]["reason"]: float(s["value"][1]) for s in prom.query(
            f"sum by (reason) (increase(eft_request_failure_total[{window}]))")}
        assert by_reason["validation"] > 0, by_reason
        forwarded = prom.query(
            f"sum by (model) (increase(eft_model_forward_seconds_count[{window}]))")
        assert {s["metric"]["model"] for s in forwarded if float(s["value"][1]) > 0} == {
            "large-base", "small-base", "helpful", "harmless"}

        # The speculative panels show sensible figures, not just some data.
        spec = {title: vals for title, vals in results.items() if "Speculative" in title}
        (acceptance,), per_drafter = spec["Speculative decoding acceptance rate"]
        assert 0 <= acceptance <= 1, acceptance
        assert per_drafter and all(0 <= v <= 1 for v in per_drafter), per_drafter
        (per_round,), (measured,) = spec["Speculative decoding speed-up"]
        assert per_round >= 1 and measured > 0, (per_round, measured)

        # The shipped alert rules evaluate against the real series without error.
        rules = prom.rules()
        assert len(rules) == 4 and all(r["health"] == "ok" for r in rules), [
            (r["name"], r["health"], r.get("lastError")) for r in rules]
