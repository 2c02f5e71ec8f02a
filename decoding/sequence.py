"""Engine-side state of a request and of each of its running rows (sibling sequences).

A `RequestState` lives from `Engine.submit` until its last sibling has finished; while its prompt
is prefilled (a `Prefill`) it holds one KV handle per model it uses. When the prompt is in, it
becomes `n` `Sequence`s (rows of the batch), each with its own handle per model, sharing the
prompt's full KV blocks. A request preempted for memory gives its rows' KV back and comes back
as one `Prefill` per row (prompt + output so far).
`Sequence.append` is the per-token bookkeeping: detokenize, check stop conditions, and build
the event the caller receives.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import torch

from .detokenizer import IncrementalDetokenizer
from .grammar import no_continuation
from .request import GenerationRequest, SamplingParams, SequenceOutput, TokenLogprob, TokenTrace


@dataclass(eq=False)
class Prefill:
    """Tokens to bring into the KV of each model of a request before its rows decode: the
    prompt (a new request; its `n` rows fork from it), or one row's prompt and output so far
    (a row resumed after preemption: recomputed, it continues where it was)."""

    tokens: dict[str, list[int]]  # model -> the ids to hold
    row: Sequence | None = None  # the resumed row, or None for a request's prompt
    slots: dict[str, int] = field(default_factory=dict)  # model -> KV handle
    cursor: dict[str, int] = field(default_factory=dict)  # model -> tokens held so far
    last_logits: dict[str, torch.Tensor] = field(default_factory=dict)  # model -> [V]
    looked_up: bool = False  # its handles exist, and the prefix cache has been asked
    hits: dict[str, int] = field(default_factory=dict)  # model -> tokens the cache held

    def left(self, model: str) -> int:
        return len(self.tokens[model]) - self.cursor.get(model, 0)

    @property
    def done(self) -> bool:
        return all(self.left(m) == 0 for m in self.tokens)


@dataclass(eq=False)
class RequestState:
    req: GenerationRequest
    loop: asyncio.AbstractEventLoop  # the caller's loop, where its events are delivered
    queue: asyncio.Queue
    models: list[str]  # models it prefills: its composition's, in family order
    done: int = 0  # siblings finished (consumer side)
    targets: list[Prefill] = field(default_factory=list)  # what is left to prefill
    order: int = 0  # admission number: the newest request is preempted first
    prompt_lp: list[TokenLogprob | None] | None = None  # echo scoring, sent with the 1st token
    prompt_trace: list[TokenTrace | None] | None = None  # echo scoring with a trace
    reasons: list[str] = field(default_factory=list)  # finish reasons of its siblings so far
    # The family's draft model, when it is not in the composition but the request may speculate:
    # each row's `draft_slot` there (outside the composition) is filled at its first block.
    draft: str | None = None
    resumed: list[Sequence] = field(default_factory=list)  # rows preempted, to continue
    unit: int = 0  # its admission unit (one HTTP request's prompts): the queue's turns

    def __post_init__(self) -> None:
        if not self.targets:
            self.targets = [Prefill({m: self.req.prompt_ids[m] for m in self.models})]

    @property
    def rid(self) -> str:
        return self.req.request_id

    @property
    def params(self) -> SamplingParams:
        return self.req.params

    @property
    def cost(self) -> int:
        """Tokens left to prefill (the longest per-model list of each target, summed)."""
        return sum(max(t.left(m) for m in t.tokens) for t in self.targets)


@dataclass(eq=False)
class Sequence:
    """One running row of the batch: a sibling sequence of a request."""

    request: RequestState
    index: int
    params: SamplingParams
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    slots: dict[str, int]  # model -> its KV handle in that model's runner
    output: list[int] = field(default_factory=list)
    finished: bool = False
    draft_slot: int | None = None  # its slot in the draft model (RequestState.draft), if any
    spec_drafted: int = 0  # tokens drafted for this row (speculative steps)
    spec_accepted: int = 0  # ... and accepted by the verification
    matcher: Any = None  # its grammar's state (llguidance), when its request has a format

    def append(
        self,
        token: int,
        eos_ids: frozenset[int],
        logprob: TokenLogprob | None = None,
        trace: TokenTrace | None = None,
    ) -> SequenceOutput:
        """Add a sampled token; the event to send (its `finish_reason` set when it ends).

        Semantics as vLLM's: EOS (unless `ignore_eos`) and `stop_token_ids` end the sequence
        without their own text but with any text held back for a possible stop string; stop
        strings are not looked for before `min_tokens` tokens; `max_tokens` ends it last.
        A row with a grammar ends ("stop") once the grammar is complete, and fails when the
        token does not fit it (only a grammar that admits nothing here samples such a token).
        """
        p = self.params
        if token < 0:
            return self.fail("the composed distribution is not finite (NaN or inf log-probs)")
        complete = False
        if self.matcher is not None:
            if not self.matcher.consume_token(token):
                return self.fail(no_continuation(self.matcher))
            complete = self.matcher.is_stopped()
        self.output.append(token)
        out = SequenceOutput(request_id=self.request.rid, index=self.index, token_ids=[token])
        if logprob is not None:
            out.logprobs = [logprob]
        if trace is not None:
            out.trace = [trace]
        if len(self.output) == 1 and self.index == 0:
            out.prompt_logprobs = self.request.prompt_lp
            out.prompt_trace = self.request.prompt_trace
        if token in eos_ids and not p.ignore_eos:
            out.finish_reason = "stop"
        elif token in p.stop_token_ids:
            out.finish_reason, out.stop_reason = "stop", token
        else:
            out.text, hit = self.detok.add(token, check_stop=len(self.output) >= p.min_tokens)
            if hit is not None:
                out.finish_reason, out.stop_reason = "stop", hit
        if out.finish_reason is None and complete:
            out.finish_reason = "stop"
        if out.finish_reason is None and len(self.output) >= p.max_tokens:
            out.finish_reason = "length"
        if out.finish_reason is not None:
            if not isinstance(out.stop_reason, str):
                out.text += self.detok.flush()
            self.finished = True
        return out

    def finish(self, reason: str, error: str | None = None) -> SequenceOutput:
        """End the row from outside (abort, shutdown); held-back text is flushed."""
        self.finished = True
        return SequenceOutput(
            request_id=self.request.rid,
            index=self.index,
            text=self.detok.flush(),
            finish_reason=reason,
            error=error,
        )

    def fail(self, error: str) -> SequenceOutput:
        self.finished = True
        return SequenceOutput(
            request_id=self.request.rid, index=self.index, finish_reason="error", error=error
        )
