"""Typed values that cross the engine boundary: what a caller submits, what it gets back.

The server builds a `GenerationRequest` (token ids per model, a `Composition`, `SamplingParams`),
hands it to `Engine.submit`, and reads `SequenceOutput` events until every sibling has finished.
Nothing here imports torch, so the server can use these types without touching tensors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


class EngineError(Exception):
    """Base class of the errors the engine raises to its caller."""


class RequestValidationError(EngineError, ValueError):
    """The request cannot be served as asked (too long, bad knob, ...). Maps to HTTP 400."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class QueueFullError(EngineError):
    """The waiting queue is at `max_waiting`. Maps to HTTP 429 with Retry-After."""


class EngineDeadError(EngineError):
    """The step loop has stopped (shut down or crashed). Maps to HTTP 503."""


@dataclass(frozen=True)
class Composition:
    """A coefficient per loaded model: `log p~ = sum_m coeffs[m] * lp_m`.

    `coeffs` maps model name -> coefficient; models absent from it are not run for this row.
    `knobs` is what the response echoes back (expert weights and filter settings actually used).
    """

    coeffs: dict[str, float]
    base_top_p: float | None = None  # nucleus of the base model applied before sampling
    plausibility: float | None = None  # contrastive-decoding plausibility alpha
    knobs: dict[str, float] = field(default_factory=dict)
    base: str | None = None  # the model whose nucleus `base_top_p` / `plausibility` use
    experts: tuple[str, ...] = ()  # the models whose weighted mixture `plausibility` uses


@dataclass
class SamplingParams:
    """Per-sequence decoding settings (OpenAI fields plus vLLM's extras)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: none; k >= 0: the chosen token plus k alternatives
    prompt_logprobs: int | None = None  # None: none; k >= 0: per prompt token (echo scoring)
    skip_special_tokens: bool = True
    trace: bool = False  # per-token log-probs of every model used (TokenTrace)
    speculative: bool = True  # False: this request never decodes speculatively
    # Structured outputs: an llguidance grammar text (`decoding.grammar`) every token of every
    # row must fit; None: unconstrained.
    grammar: str | None = None

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


@dataclass
class GenerationRequest:
    """One request: n sibling sequences that share a prompt and a composition.

    `prompt_ids` maps model name -> that model's prompt tokens. Completions give every model the
    same list; chat gives each model its own chat-template rendering.
    """

    request_id: str
    prompt_ids: dict[str, list[int]]
    composition: Composition
    params: SamplingParams = field(default_factory=SamplingParams)
    # Who sent it (e.g. the peer address): the waiting queue takes turns between clients.
    client: str | None = None


@dataclass
class TokenLogprob:
    """The chosen token's log-prob and its top alternatives, under the composed distribution."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class TokenTrace:
    """Why a token came out: its composed log-prob and each model's own view of it.

    `models` maps every model the row used to its log-prob of the token (`lp_m`), `argmax`
    to that model's own most likely token. The server derives the implicit rewards
    (`lp_expert - lp_reference`) and whether the composition changed the token from these.
    """

    token_id: int
    logprob: float  # composed
    models: dict[str, float] = field(default_factory=dict)
    argmax: dict[str, int] = field(default_factory=dict)


@dataclass
class SequenceOutput:
    """One increment of one sibling sequence (index `index` of the request's n).

    `text` is the new detokenized text (stop strings already cut); `token_ids` the new tokens.
    The last event of a sibling has `finish_reason` set: "stop", "length", "abort" or "error"
    (then `error` says why). `prompt_logprobs` comes once, on the first event, when asked for
    (the first prompt token has None).
    """

    request_id: str
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    error: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    trace: list[TokenTrace] | None = None  # per new token, when the request asked for it
    prompt_trace: list[TokenTrace | None] | None = None  # with prompt_logprobs and trace
    # Speculative decoding, on the first event of a speculative step: tokens this sequence's
    # drafter proposed in the step, and how many of them the verification accepted.
    spec_drafted: int = 0
    spec_accepted: int = 0


@dataclass
class StepStats:
    """What one engine step did; passed to the engine's `on_step` observer (the metrics).

    Called from the engine's thread after every step, so an observer must be cheap and must
    not block. Token counts include rows whose client has gone.
    """

    batch_size: int  # rows that produced a token this step
    num_running: int  # requests with rows in the batch after the step
    num_waiting: int  # sequences (prompts x n) queued for admission after the step
    prompt_tokens: int = 0  # prompt tokens prefilled this step (per request, longest model's)
    generated_tokens: int = 0
    step_seconds: float = 0.0
    forward_seconds: dict[str, float] = field(default_factory=dict)  # per model run this step
    combine_seconds: float = 0.0
    sample_seconds: float = 0.0
    kv_cache_tokens: dict[str, int] = field(default_factory=dict)  # per model, tokens held
    kv_cache_bytes: dict[str, int] = field(default_factory=dict)  # per model, blocks in use
    kv_cache_capacity_bytes: dict[str, int] = field(default_factory=dict)  # per model, the pool
    kv_cache_usage: float = 0.0  # blocks in use / blocks, over every pool
    # Prefix caching, per model: prompt tokens looked up this step, and found cached.
    prefix_cache_queries: dict[str, int] = field(default_factory=dict)
    prefix_cache_hits: dict[str, int] = field(default_factory=dict)
    preemptions: int = 0  # requests preempted this step (KV freed, requeued, recomputed)
    finished: list[tuple[str, str]] = field(default_factory=list)  # (request_id, finish_reason)
    spec_draft_tokens: int = 0  # speculative decoding: tokens drafted this step
    spec_accepted_tokens: int = 0  # ... and accepted by the verification
    spec_num_drafts: int = 0  # ... and blocks drafted (rows that speculated; one verify each)
    # ... and per block: (the model that drafted it, tokens drafted, tokens accepted)
    spec_blocks: list[tuple[str, int, int]] = field(default_factory=list)
    # The `auto` policy's measured seconds per token without / with speculation at this step's
    # batch size, once it has measured both there (None otherwise).
    spec_speedup: float | None = None

    def add_forward(self, model: str, since: float) -> None:
        """Counts the time since `since` (a `time.perf_counter()`) as `model`'s forward time."""
        self.forward_seconds[model] = self.forward_seconds.get(model, 0.0) + (
            time.perf_counter() - since
        )
