"""Prometheus collectors (docs/metrics.md names, prefix `eft_`, mirroring vLLM's).

Two feeds:
- the engine's `on_step(StepStats)` observer (engine thread): batch size, per-model forward time,
  combine/sample/step time, token counters, KV-cache occupancy and capacity, prefix-cache
  lookups, preemptions, speculative counters;
- the HTTP layer (event loop): TTFT, inter-token and end-to-end latency, per-request sizes,
  finish and failure reasons, knob usage.
Running/waiting are read from the engine at scrape time, so they are exact even when the engine
is idle and no step runs to report them (a cancelled request drops to 0 at once).

Every label value comes from a finite set fixed at start (model names, experts, reasons), and
all of them are initialised so each series exists from the first scrape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from decoding.request import StepStats

FINISHED_REASONS = ("stop", "length")
# validation: 400; not_found: unknown model (404); unauthorized: 401; too_large: body over the
# limit (413); overloaded: queue full (429); aborted: client went away; unavailable: engine dead
# or shutting down (503); error: the engine failed the sequence (e.g. NaN) or a server bug (500).
FAILURE_REASONS = (
    "validation",
    "not_found",
    "unauthorized",
    "too_large",
    "overloaded",
    "aborted",
    "unavailable",
    "error",
)

# Engine-side timings: sub-millisecond resolution for a GPU step, up to seconds for a CPU one.
STEP_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
# vLLM's TTFT buckets, with finer steps at the low end for small models.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
# A block's accepted share: blocks are at most 8 tokens, so eighths (0 = rejected at once).
ACCEPTANCE_BUCKETS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


class ServerMetrics:
    """All collectors of one server, in a registry of their own (tests build several apps)."""

    def __init__(
        self, model_names: list[str], experts: list[str], roles: dict[str, str] | None = None
    ):
        self.registry = r = CollectorRegistry(auto_describe=True)
        # Process / GC / platform, as the default registry has them (dashboards expect
        # process_resident_memory_bytes and friends).
        process_collector.ProcessCollector(registry=r)
        gc_collector.GCCollector(registry=r)
        platform_collector.PlatformCollector(registry=r)
        self.model_names = list(model_names)
        self.experts = list(experts)

        self.num_running = Gauge(
            "eft_num_requests_running", "Requests holding a batch slot.", registry=r
        )
        self.num_waiting = Gauge(
            "eft_num_requests_waiting", "Sequences (prompts x n) queued for a batch row.",
            registry=r
        )
        self.request_success = Counter(
            "eft_request_success",
            "Finished sequences by finish reason (one per choice).",
            ["finished_reason"],
            registry=r,
        )
        self.request_failure = Counter(
            "eft_request_failure",
            "Failed or refused HTTP requests by reason.",
            ["reason"],
            registry=r,
        )
        self.prompt_tokens = Counter("eft_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter(
            "eft_generation_tokens",
            "Tokens generated (also for clients that have gone).",
            registry=r,
        )
        self.ttft = Histogram(
            "eft_time_to_first_token_seconds",
            "Request arrival to its first generated token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "eft_inter_token_latency_seconds",
            "Time between consecutive tokens of one sequence.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "eft_e2e_request_latency_seconds",
            "Request arrival to its last token.",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.request_prompt_tokens = Histogram(
            "eft_request_prompt_tokens",
            "Prompt length per request (longest model's).",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.request_generation_tokens = Histogram(
            "eft_request_generation_tokens",
            "Generated tokens per request (all choices).",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "eft_batch_size", "Rows per engine step.", buckets=BATCH_BUCKETS, registry=r
        )
        self.model_forward = Histogram(
            "eft_model_forward_seconds",
            "Forward time of one model in one step.",
            ["model"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.combine = Histogram(
            "eft_combine_seconds",
            "Time to combine the models' log-probs in one step.",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.sample = Histogram(
            "eft_sample_seconds",
            "Time to sample one step's tokens.",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.step = Histogram(
            "eft_step_seconds", "Wall time of one engine step.", buckets=STEP_BUCKETS, registry=r
        )
        self.kv_tokens = Gauge(
            "eft_kv_cache_tokens", "KV-cache tokens held per model.", ["model"], registry=r
        )
        self.kv_bytes = Gauge(
            "eft_kv_cache_bytes",
            "KV-cache bytes in use per model (its blocks in use).",
            ["model"],
            registry=r,
        )
        self.kv_capacity = Gauge(
            "eft_kv_cache_capacity_bytes",
            "KV-cache pool bytes per model, allocated once at start.",
            ["model"],
            registry=r,
        )
        self.kv_usage = Gauge(
            "eft_kv_cache_usage",
            "Fraction of KV-cache blocks in use, over every model's pool "
            "(1 = full: new requests wait, running ones may be preempted).",
            registry=r,
        )
        self.prefix_queries = Counter(
            "eft_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            ["model"],
            registry=r,
        )
        self.prefix_hits = Counter(
            "eft_prefix_cache_hits",
            "Prompt tokens found in the prefix cache (not recomputed).",
            ["model"],
            registry=r,
        )
        self.preemptions = Counter(
            "eft_num_preemptions",
            "Requests preempted for KV-cache space (their KV freed, recomputed when they resume).",
            registry=r,
        )
        self.spec_draft = Counter(
            "eft_spec_decode_draft_tokens", "Tokens drafted by the expert mixture.", registry=r
        )
        self.spec_accepted = Counter(
            "eft_spec_decode_accepted_tokens", "Drafted tokens the base accepted.", registry=r
        )
        self.spec_drafts = Counter(
            "eft_spec_decode_num_drafts",
            "Blocks drafted (one per speculating row and step; each verified in one forward).",
            registry=r,
        )
        self.spec_acceptance = Histogram(
            "eft_spec_decode_acceptance_rate",
            "Accepted / drafted tokens of one block, by the model that drafted it (how far the "
            "up-scaled distribution strays from that expert's).",
            ["drafter"],
            buckets=ACCEPTANCE_BUCKETS,
            registry=r,
        )
        self.spec_speedup = Gauge(
            "eft_spec_decode_measured_speedup",
            "The auto policy's latest measured seconds per token without / with speculation, "
            "at the batch size of the last step that could speculate (NaN until measured).",
            registry=r,
        )
        self.spec_speedup.set(float("nan"))
        self.knob_requests = Counter(
            "eft_knob_requests",
            "Requests that applied an expert with weight > 0.",
            ["expert"],
            registry=r,
        )
        self.model_info = Gauge(
            "eft_model_info",
            "Loaded models (value 1) and their role.",
            ["model", "role"],
            registry=r,
        )
        self.ready = Gauge("eft_ready", "1 once the engine has warmed up.", registry=r)

        for reason in FINISHED_REASONS:
            self.request_success.labels(finished_reason=reason)
        for reason in FAILURE_REASONS:
            self.request_failure.labels(reason=reason)
        for m in self.model_names:
            self.model_forward.labels(model=m)
            for per_model in (
                self.kv_tokens,
                self.kv_bytes,
                self.kv_capacity,
                self.prefix_queries,
                self.prefix_hits,
            ):
                per_model.labels(model=m)
            self.model_info.labels(model=m, role=(roles or {}).get(m, "model")).set(1)
        for e in self.experts:
            self.knob_requests.labels(expert=e)
        self.drafters = {m for m, role in (roles or {}).items() if role in ("expert", "draft")}
        self.drafters |= set(self.experts)
        for d in self.drafters:
            self.spec_acceptance.labels(drafter=d)

    @classmethod
    def for_family(cls, family: Any) -> ServerMetrics:
        cfg = family.config
        roles = {cfg.base: "base", cfg.reference: "reference", **{e: "expert" for e in cfg.experts}}
        if cfg.draft is not None:
            roles.setdefault(cfg.draft, "draft")
        return cls(list(family.models), list(cfg.experts), roles)

    def bind_engine(
        self,
        num_running: Callable[[], float],
        num_waiting: Callable[[], float],
        ready: Callable[[], bool],
    ) -> None:
        """Read the queue gauges live at scrape time instead of from the last step."""
        self.num_running.set_function(lambda: float(num_running()))
        self.num_waiting.set_function(lambda: float(num_waiting()))
        self.ready.set_function(lambda: 1.0 if ready() else 0.0)

    # ------------------------------------------------------------ engine feed (engine thread)
    def on_step(self, s: StepStats) -> None:
        """The engine's step observer. Cheap: a handful of lock-protected float additions."""
        _record_nonzero(
            (self.batch_size.observe, s.batch_size),
            (self.prompt_tokens.inc, s.prompt_tokens),
            (self.generation_tokens.inc, s.generated_tokens),
            (self.step.observe, s.step_seconds),
            (self.combine.observe, s.combine_seconds),
            (self.sample.observe, s.sample_seconds),
        )
        for model, sec in s.forward_seconds.items():
            if model in self.model_names:  # never create a label value we did not expect
                self.model_forward.labels(model=model).observe(sec)
        self._kv_occupancy(s)
        for model, n in self._known(s.kv_cache_capacity_bytes):
            self.kv_capacity.labels(model=model).set(n)
        for model, n in self._known(s.prefix_cache_queries):
            self.prefix_queries.labels(model=model).inc(n)
        for model, n in self._known(s.prefix_cache_hits):
            self.prefix_hits.labels(model=model).inc(n)
        _record_nonzero(
            (self.preemptions.inc, s.preemptions),
            (self.spec_draft.inc, s.spec_draft_tokens),
            (self.spec_accepted.inc, s.spec_accepted_tokens),
            (self.spec_drafts.inc, s.spec_num_drafts),
        )
        for drafter, drafted, accepted in s.spec_blocks:
            if drafter in self.drafters:
                self.spec_acceptance.labels(drafter=drafter).observe(accepted / drafted)
        if s.spec_speedup is not None:
            self.spec_speedup.set(s.spec_speedup)

    def _kv_occupancy(self, s: StepStats) -> None:
        """Tokens, bytes and blocks in use. Only a report with KV figures carries them: the
        one after a cancel has none, and its default usage of 0 would be a false "empty"."""
        if s.kv_cache_tokens or s.kv_cache_bytes:
            for model, n in self._known(s.kv_cache_tokens):
                self.kv_tokens.labels(model=model).set(n)
            for model, n in self._known(s.kv_cache_bytes):
                self.kv_bytes.labels(model=model).set(n)
            self.kv_usage.set(s.kv_cache_usage)
        elif s.num_running == 0 and s.num_waiting == 0:
            # Nothing runs and nothing waits: no block is in use (cached prefixes of finished
            # requests are free to evict, so they count as free, as in vLLM), and no step
            # will follow to say so.
            for m in self.model_names:
                self.kv_tokens.labels(model=m).set(0)
                self.kv_bytes.labels(model=m).set(0)
            self.kv_usage.set(0)

    def _known(self, per_model: dict[str, int]) -> list[tuple[str, int]]:
        """The report's entries for the models fixed at start: any other name would create a
        label value, hence a series, that nobody expects."""
        return [(m, n) for m, n in per_model.items() if m in self.model_names]

    # ------------------------------------------------------------ HTTP feed (event loop)
    def failure(self, reason: str) -> None:
        self.request_failure.labels(reason=reason if reason in FAILURE_REASONS else "error").inc()

    def finished(self, reason: str | None) -> None:
        if reason in FINISHED_REASONS:
            self.request_success.labels(finished_reason=reason).inc()

    def knobs_used(self, coeffs: dict[str, float]) -> None:
        for e in self.experts:
            if coeffs.get(e, 0.0) > 0:
                self.knob_requests.labels(expert=e).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _record_nonzero(*pairs: tuple[Callable[[float], None], float]) -> None:
    """Record each value that is not 0: a zero means the step did none of that work."""
    for record, value in pairs:
        if value:
            record(value)
