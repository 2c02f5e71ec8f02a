"""The engine: an async API in front of one thread that owns every model's state.

Callers live on an asyncio loop: `submit()` validates a request synchronously (context length,
queue bound), puts it in the inbox and returns an async iterator of `SequenceOutput`, fed
through `loop.call_soon_threadsafe`; leaving the iterator early cancels the request.

The engine thread drains the inbox between steps and runs `step()` while there is work:

    plan = scheduler.schedule()            who runs (bookkeeping only)
    prefill chunks -> runners              one forward per set of weights over the prompt chunks
    decode rows    -> runners              one forward per set of weights over its rows
    sampler.sample(rows, parts)            combine, penalties, bans, filters, draw
    Sequence.append per row                detokenize, stop checks -> events
    free the slots of finished rows

An exception in a phase fails exactly the requests that phase touched (a final "error" event
each, their slots freed) and the engine goes on serving the others.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

import torch

from . import boundary
from .composition import log_probs
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .errors import FamilyError
from .family import Family
from .grammar import Grammars
from .memory import size_pools
from .request import (
    Composition,
    EngineDeadError,
    GenerationRequest,
    QueueFullError,
    RequestValidationError,
    SamplingParams,
    SequenceOutput,
    StepStats,
)
from .runner import ModelRunner, UnsupportedModelError, unique_runners, weight_groups
from .sampler import Part, Sampler, prompt_logprobs
from .scheduler import PrefillChunk, Scheduler, StepPlan
from .sequence import Prefill, RequestState, Sequence
from .speculative import SpecPolicy, SpeculativeDecoder, drafter, may_speculate

__all__ = ["Engine", "EngineConfig"]

log = logging.getLogger(__name__)

TRIM_AFTER_IDLE_S = 1.0  # quiet time before the freed heap memory is handed back

Events = list[tuple[RequestState, SequenceOutput]]


@dataclass
class Submit:
    state: RequestState


@dataclass
class Cancel:
    request_id: str


class Engine:
    def __init__(
        self,
        family: Family,
        config: EngineConfig | None = None,
        on_step: Callable[[StepStats], None] | None = None,
    ):
        self.family = family
        self.config = config or EngineConfig()
        self.on_step = on_step
        self.device = family.device
        self.vocab_size = family.vocab_size
        self.ready = False
        # Inbox: the only state shared with the caller's thread.
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: list[Submit | Cancel] = []
        self._num_waiting = 0  # sequences (prompts x n) submitted and not yet admitted
        self._units = 0  # admission units submitted so far (the fair queue's request key)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._dead: str | None = None
        # Everything below belongs to the engine thread.
        # One runner per set of weights; the entries sharing it (a model and its adapters)
        # are its members, with their own KV, and run as one forward.
        self.runners: dict[str, ModelRunner] = {}
        for names in weight_groups(family):
            try:
                runner = ModelRunner([family.models[n] for n in names])
            except UnsupportedModelError as exc:
                raise FamilyError(f"model {names[0]!r}: {exc}") from exc
            self.runners.update(dict.fromkeys(names, runner))
        self.groups = unique_runners(self.runners)  # each runner once, with its members
        if family.config.experts:  # one warning line if the models start answers unalike
            boundary.check_family(family, lambda n, ids: self.runners[n].last_logits(n, ids))
        try:
            size_pools(self.groups, self.config, family.context_limit, family.vocab_size)
        except ValueError as exc:
            raise FamilyError(str(exc)) from exc
        for runner, names in self.groups:
            try:
                runner.self_check()
            except UnsupportedModelError as exc:
                raise FamilyError(f"model {names[0]!r}: {exc}") from exc
        if self.config.cuda_graphs == "on":
            self._enable_graphs()
        self.scheduler = Scheduler(self.config, self.runners)
        # Structured outputs: grammars compiled against the family's tokenizer (thread-safe:
        # the server compiles off its event loop before it submits).
        self.grammars = Grammars(family.tokenizer, family.vocab_size, family.eos_token_ids)
        self.sampler = Sampler(
            family.vocab_size,
            family.device,
            family.eos_token_ids,
            self.config.seed,
            self.grammars,
        )
        self.spec_policy = SpecPolicy(str(self.config.speculative))
        self.speculator = SpeculativeDecoder(
            self.runners, self.sampler, family.vocab_size, family.device, self.spec_policy
        )
        self._experts = tuple(family.config.experts)
        self._draft = family.config.draft if self.spec_policy.mode != "off" else None
        # Per-row tensors are rebuilt only when the rows they were built for change.
        self._batch: list[Sequence] = []  # rows of `_last`, the next decode's input tokens
        self._last = torch.zeros(0, dtype=torch.long, device=self.device)
        self._sampler_rows: list[Sequence] = []
        self._member_rows: list[Sequence] | None = None
        self._members: dict[str, tuple[torch.Tensor, torch.Tensor, list[int]]] = {}
        self._runner_index: dict[int, torch.Tensor] = {}  # runner -> its decode rows, in order

    def _enable_graphs(self) -> None:
        """Decode from CUDA graphs where each runner's check allows (one log line each)."""
        capture = self.device.type == "cuda"
        for runner, names in self.groups:
            why = runner.enable_graphs(
                self.config.max_batch_size, self.family.context_limit, capture
            )
            how = "captured" if capture else "no capture off CUDA: the buffers run eagerly"
            log.info("decode graphs for %s: %s", "/".join(names),
                     f"off ({why})" if why else f"on ({how}; batch buckets "
                     f"{','.join(map(str, runner.graphs.buckets))})")  # fmt: skip

    # ----------------------------------------------------------------- caller side (asyncio)

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def max_seqs_per_request(self) -> int:
        """Sequences one request may bring: its share, and never more than the queue (or a
        free batch) could ever take, which would leave it refused with 429 forever."""
        cfg = self.config
        return min(cfg.max_seqs_per_request, max(cfg.max_waiting, cfg.max_batch_size))

    @property
    def dead(self) -> str | None:
        """Why the step loop is gone (crashed or shut down), or None while it can serve."""
        if self._dead:
            return self._dead
        if self._stopping or (self._thread is not None and not self._thread.is_alive()):
            return "the engine has stopped"
        return None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="eft-engine", daemon=True)
            self._thread.start()

    async def warmup(self) -> None:
        """One 1-token request through every model; sets `ready` when it succeeds."""
        coeffs = {name: 1.0 for name in self.family.models}
        prompt = self.family.tokenizer.encode("Hello", add_special_tokens=True) or [0]
        req = GenerationRequest(
            request_id=f"warmup-{uuid.uuid4().hex[:8]}",
            prompt_ids={name: prompt for name in coeffs},
            composition=Composition(coeffs=coeffs),
            params=SamplingParams(max_tokens=1, temperature=0.0),
        )
        async for out in self.submit(req):
            if out.finish_reason == "error":
                raise RuntimeError(f"warmup failed: {out.error}")
        self.ready = True

    def submit(self, req: GenerationRequest) -> AsyncIterator[SequenceOutput]:
        """Queue a request; iterate the result for its events. Validates synchronously."""
        return self.submit_all([req])[0]

    def submit_all(self, reqs: list[GenerationRequest]) -> list[AsyncIterator[SequenceOutput]]:
        """Queue several requests as one admission unit (one HTTP request's prompts): all of
        them or none. The queue is counted in sequences (prompts x n): a unit may bring at most
        `max_seqs_per_request` of them (more is a RequestValidationError, it could never be
        queued fairly) and is refused (QueueFullError) when the queue cannot take them all,
        unless batch rows are free for them right away."""
        if self._dead or self._stopping:
            raise EngineDeadError(self._dead or "the engine is shutting down")
        cfg = self.config
        seqs = sum(r.params.n for r in reqs)
        if seqs > self.max_seqs_per_request:
            raise RequestValidationError(
                f"this request asks for {seqs} sequences ({len(reqs)} prompt(s) x n); one "
                f"request may have at most {self.max_seqs_per_request} "
                "(--max-seqs-per-request, within --max-waiting)",
                param="n",
            )
        states = [self._validate(req) for req in reqs]
        with self._lock:
            waiting = self._num_waiting
            fits = waiting + seqs <= cfg.max_waiting
            rows_free = self.scheduler.rows_reserved() + waiting + seqs <= cfg.max_batch_size
            if not fits and not rows_free:
                raise QueueFullError(
                    f"the waiting queue holds {waiting} of {cfg.max_waiting} sequences "
                    f"(--max-waiting) and this request needs {seqs}"
                )
            self._units += 1
            for state in states:
                state.unit = self._units
            self._num_waiting += seqs
            self._inbox.extend(Submit(state) for state in states)
        self._wake.set()
        self.start()
        return [self._stream(state) for state in states]

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(Cancel(request_id))
        self._wake.set()

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what is left and stop the step loop (bounded by `timeout`)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout)

    async def _stream(self, state: RequestState) -> AsyncIterator[SequenceOutput]:
        n = state.req.params.n
        try:
            while state.done < n:
                out = await state.queue.get()
                if out.finish_reason is not None:
                    state.done += 1
                yield out
        finally:
            if state.done < n:
                self.cancel(state.rid)

    def _validate(self, req: GenerationRequest) -> RequestState:
        p = req.params
        comp = req.composition
        if not comp.coeffs:
            raise RequestValidationError("the composition uses no model", param="model")
        models = [m for m in self.family.models if m in comp.coeffs]
        if len(models) != len(comp.coeffs):
            unknown = sorted(set(comp.coeffs) - set(models))
            raise RequestValidationError(f"unknown model(s) {unknown}", param="model")
        if p.n < 1 or p.n > self.config.max_batch_size:
            raise RequestValidationError(
                f"n must be between 1 and {self.config.max_batch_size}", param="n"
            )
        if p.max_tokens < 0:
            raise RequestValidationError("max_tokens must be >= 0", param="max_tokens")
        for m in models:
            ids = req.prompt_ids.get(m)
            if not ids:
                raise RequestValidationError("the prompt is empty", param="prompt")
            if min(ids) < 0 or max(ids) >= self.vocab_size:
                raise RequestValidationError(
                    f"prompt token ids must be in [0, {self.vocab_size})", param="prompt"
                )
            limit = self.family.context_limit
            if len(ids) + p.max_tokens > limit:
                raise RequestValidationError(
                    f"This model's maximum context length is {limit} tokens. However, you "
                    f"requested {len(ids) + p.max_tokens} tokens ({len(ids)} in the messages, "
                    f"{p.max_tokens} in the completion). Please reduce the length of the "
                    "messages or completion.",
                    param="max_tokens",
                )
        if p.grammar is not None:
            self.grammars.compile(p.grammar)  # a 400 for a bad one (cached: the server's compile)
        if p.prompt_logprobs is not None and len({tuple(req.prompt_ids[m]) for m in models}) > 1:
            raise RequestValidationError(
                "prompt log-probs need the same prompt for every model", param="echo"
            )
        draft = self._draft_for(req)  # its KV comes at the row's first speculative block
        state = RequestState(req, asyncio.get_running_loop(), asyncio.Queue(), models, draft=draft)
        too_big = self.scheduler.fits(state)
        if too_big is not None:
            raise RequestValidationError(too_big, param="max_tokens")
        return state

    def _draft_for(self, req: GenerationRequest) -> str | None:
        """The family's draft model, when this request's rows may draft with it from outside
        their composition: each row then gets a slot of its own there, filled with its prompt
        and output at its first speculative block (so a request that never speculates costs the
        draft model nothing). Its prompt must fit like every model's; else the rows draft with
        their heaviest expert."""
        draft, p, coeffs = self._draft, req.params, req.composition.coeffs
        if draft is None or draft in coeffs or self.family.config.base not in coeffs:
            return None
        if not may_speculate(p) or p.prompt_logprobs is not None or p.max_tokens < 2:
            return None
        ids = req.prompt_ids.get(draft)
        fits = bool(ids) and len(ids) + p.max_tokens <= self.family.context_limit
        return draft if fits and 0 <= min(ids) and max(ids) < self.vocab_size else None

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        idle_since: float | None = None
        trimmed = True  # nothing to give back before the first request
        try:
            while True:
                self._drain_inbox()
                if self._stopping:
                    self._abort_all("the engine is shutting down")
                    return
                if not self.scheduler.has_work():
                    now = time.monotonic()
                    if idle_since is None:
                        idle_since = now
                    elif not trimmed and now - idle_since >= TRIM_AFTER_IDLE_S:
                        release_freed_memory()
                        trimmed = True
                    self._wake.wait(self.config.idle_wait_s)
                    self._wake.clear()
                    continue
                idle_since, trimmed = None, False
                try:
                    self.step()
                except Exception as exc:  # noqa: BLE001 - a bug outside the guarded phases
                    log.exception("engine step failed")
                    self._abort_all(f"engine step failed: {exc}", "error", keep_waiting=True)
        except BaseException as exc:  # pragma: no cover - last resort
            self._dead = f"the engine stopped: {exc}"
            log.exception("engine thread died")
            self._abort_all(self._dead, reason="error")
            raise

    def _drain_inbox(self) -> None:
        with self._lock:
            items, self._inbox = self._inbox, []
        cancelled = set()
        for item in items:
            if isinstance(item, Submit):
                self.scheduler.waiting.append(item.state)
            else:
                cancelled.add(item.request_id)
        if cancelled:
            self._cancel(cancelled)

    @torch.inference_mode()
    def step(self) -> None:
        """One step: plan, one forward per set of weights (decode rows and prompt chunks
        together), sample, post-process, deliver."""
        t_start = time.perf_counter()
        plan, admitted = self.scheduler.schedule()
        self._dequeued(_seqs(admitted) - _seqs(plan.preempted))
        stats = StepStats(
            batch_size=0,
            num_running=0,
            num_waiting=0,
            prefix_cache_queries=plan.queries,
            prefix_cache_hits=plan.hits,
            preemptions=len(plan.preempted),
        )
        events: Events = []
        self._align(plan.decode)
        # A step speculates when every row can (`eligible`) and the policy says so now.
        eligible = self._drafters(plan.decode) if not plan.prefill else None
        drafters = eligible if eligible and self.spec_policy.use(len(plan.decode)) else None
        if drafters is not None:
            self._speculate(plan.decode, drafters, stats, events)
        elif not plan.empty:
            self._plain_step(plan, stats, events)
        self._retire()
        self._deliver(events)
        if eligible:
            # Only steps that could have speculated measure the policy's two options, so
            # both costs are of the same kind of rows.
            seconds = time.perf_counter() - t_start
            batch = len(plan.decode)
            self.spec_policy.observe(batch, drafters is not None, seconds, stats.generated_tokens)
            stats.spec_speedup = self.spec_policy.speedup(batch)
        self._finish_stats(stats, events, t_start)

    def _plain_step(self, plan: StepPlan, stats: StepStats, events: Events) -> None:
        try:
            decode_logits, full = self._forward(plan, stats)
        except Exception as exc:  # noqa: BLE001 - a bug or OOM fails this step's requests only
            log.exception("engine step failed")
            # The prompts are the likelier cause (new input, more memory): they fail, and the
            # decode rows are tried once more alone.
            events += self._fail_prompts(plan, exc)
            plan.prefill = []
            try:
                decode_logits, full = self._forward(plan, stats)
            except Exception as again:  # noqa: BLE001
                events += self._fail_rows(plan.decode, again)
                return
        joined = self._complete_prefills(plan.prefill, full, events)
        rows = plan.decode + [seq for seq, _ in joined]
        if not rows:
            return
        try:
            parts = self._decode_parts(decode_logits)
            parts += self._first_token_parts(joined, len(plan.decode))
            if rows != self._sampler_rows:
                self.sampler.prepare(rows)
                self._sampler_rows = rows
            t0 = time.perf_counter()
            result = self.sampler.sample(rows, parts)
            stats.combine_seconds = result.combine_seconds
            stats.sample_seconds = time.perf_counter() - t0 - result.combine_seconds
        except Exception as exc:  # noqa: BLE001 - a bug or OOM fails these rows, not the server
            log.exception("engine step failed")
            events += self._fail_rows(rows, exc)
            return
        eos = self.family.eos_token_ids
        for i, seq in enumerate(rows):
            out = seq.append(result.tokens[i], eos, result.logprobs[i], result.traces[i])
            events.append((seq.request, out))
        self._batch, self._last = rows, result.on_device
        stats.batch_size = stats.generated_tokens = len(rows)

    def _fail_rows(self, rows: list[Sequence], exc: Exception) -> Events:
        """Fail the rows of a step that raised; the next step rebuilds the per-row state."""
        self._batch, self._sampler_rows, self._member_rows = [], [], None
        self._last = self._last[:0]
        events = [(s.request, s.fail(f"engine step failed: {exc}")) for s in rows]
        for s in rows:  # their KV may hold what broke (NaN): scrubbed as it is freed
            self.scheduler.free_row(s, scrub=True)
        return events

    def _fail_prompts(self, plan: StepPlan, exc: Exception) -> Events:
        """A forward raised: fail the requests of its prompt chunks."""
        events: Events = []
        for state in {id(c.state): c.state for c in plan.prefill}.values():
            events += self._end_unfinished(state, "error", f"engine step failed: {exc}")
            self.scheduler.drop_prefilling(state)
            self._free_targets(state, scrub=True)
        return events

    # ---------------------------------------------------------------- speculation

    def _drafters(self, rows: list[Sequence]) -> list[str] | None:
        """Each row's drafting model when every row of the step can speculate, else None."""
        if not rows or self.spec_policy.mode == "off":
            return None
        out = []
        for seq in rows:
            name = drafter(seq, self._experts, self._draft)
            if name is None:
                return None
            out.append(name)
        return out

    def _speculate(
        self, rows: list[Sequence], drafters: list[str], stats: StepStats, events: Events
    ) -> None:
        try:
            if rows != self._sampler_rows:
                self.sampler.prepare(rows)
                self._sampler_rows = rows
            result = self.speculator.step(rows, drafters, self._last, stats)
        except Exception as exc:  # noqa: BLE001 - fails these rows, not the server
            log.exception("speculative step failed")
            events += self._fail_rows(rows, exc)
            return
        eos = self.family.eos_token_ids
        for i, (seq, tokens, lps) in enumerate(zip(rows, result.tokens, result.logprobs)):
            drafted, accepted = result.drafted[i], result.accepted[i]
            seq.spec_drafted += drafted
            seq.spec_accepted += accepted
            for j, (tok, lp) in enumerate(zip(tokens, lps)):
                out = seq.append(tok, eos, lp)
                if j == 0:  # the step's counts ride on the row's first event
                    out.spec_drafted, out.spec_accepted = drafted, accepted
                events.append((seq.request, out))
                stats.generated_tokens += 1
                if seq.finished:
                    break
        self._batch, self._last = rows, result.last
        stats.batch_size = len(rows)
        stats.spec_draft_tokens = sum(result.drafted)
        stats.spec_accepted_tokens = sum(result.accepted)
        stats.spec_num_drafts = sum(1 for k in result.drafted if k > 0)
        stats.spec_blocks = [
            (d, k, a) for d, k, a in zip(drafters, result.drafted, result.accepted) if k > 0
        ]

    # ---------------------------------------------------------------- the forward

    def _forward(
        self, plan: StepPlan, stats: StepStats
    ) -> tuple[dict[int, torch.Tensor], dict[tuple[str, int], torch.Tensor]]:
        """One forward per set of weights over its decode rows (members in order) and the
        prompt chunks of its members. Returns each runner's decode logits, and the
        all-position logits of echo-scoring chunks ((model, target) -> [T, V]); the last
        logits of every chunk go to its target."""
        members = self._membership(plan.decode)
        decode_logits: dict[int, torch.Tensor] = {}
        full: dict[tuple[str, int], torch.Tensor] = {}
        for runner, names in self.groups:
            handles: list[int] = []
            tokens: list[int] = []
            for n in names:
                if n in members:
                    handles += members[n][2]
                    tokens += members[n][3]
            n_dec = len(handles)
            chunks: list[list[int] | None] = [None] * n_dec
            keep = [False] * n_dec
            mine: list[tuple[PrefillChunk, str]] = []
            for c in plan.prefill:
                for n in names:
                    if n in c.spans:
                        start, end = c.spans[n]
                        handles.append(c.target.slots[n])
                        chunks.append(c.target.tokens[n][start:end])
                        keep.append(c.state.params.prompt_logprobs is not None)
                        mine.append((c, n))
            if not handles:
                continue
            ids = self._last.index_select(0, self._runner_index[id(runner)]) if n_dec else None
            t0 = time.perf_counter()
            logits = runner.forward(handles, chunks, ids, keep, tokens)
            stats.add_forward(runner.name, t0)
            if n_dec:
                decode_logits[id(runner)] = logits[:n_dec]
            at = n_dec
            for (c, n), k in zip(mine, keep[n_dec:]):
                start, end = c.spans[n]
                width = end - start if k else 1
                c.target.last_logits[n] = logits[at + width - 1]
                if k:
                    full[(n, id(c.target))] = logits[at : at + width]
                at += width
        stats.prompt_tokens += sum(c.tokens for c in plan.prefill)
        return decode_logits, full

    def _decode_parts(self, decode_logits: dict[int, torch.Tensor]) -> list[Part]:
        """The decode rows' log-probs per model: one log-softmax per runner, split by member."""
        parts: list[Part] = []
        for runner, names in self.groups:
            logits = decode_logits.get(id(runner))
            if logits is None:
                continue
            lp = log_probs(logits.to(self.device), self.vocab_size)
            at = 0
            for n in names:
                if n in self._members:
                    idx, coef, slots, _ = self._members[n]
                    parts.append((n, idx, coef, lp[at : at + len(slots)]))
                    at += len(slots)
        return parts

    def _membership(self, rows: list[Sequence]) -> dict:
        """Per model: the batch rows that use it, their coefficients, their KV handles and
        their pending tokens; rebuilt when the rows change (the tokens every step)."""
        if rows != self._member_rows:
            out = {}
            for name in self.runners:
                idx = [i for i, s in enumerate(rows) if name in s.slots]
                if idx:
                    coeffs = [rows[i].request.req.composition.coeffs[name] for i in idx]
                    out[name] = (
                        torch.tensor(idx, device=self.device),
                        torch.tensor(coeffs, dtype=torch.float32, device=self.device),
                        [rows[i].slots[name] for i in idx],
                        idx,
                    )
            self._members, self._member_rows = out, list(rows)
            self._runner_index = {
                id(runner): torch.cat([out[n][0] for n in names if n in out])
                for runner, names in self.groups
                if any(n in out for n in names)
            }
        # The host ids of the pending tokens (the prefix cache keys blocks by them).
        return {
            n: (idx, coef, slots, [rows[i].output[-1] for i in pos])
            for n, (idx, coef, slots, pos) in self._members.items()
        }

    def _align(self, rows: list[Sequence]) -> None:
        """Keep `_last` (the pending tokens on the device) in the order of this step's rows
        after rows finished or were preempted."""
        if rows == self._batch:
            return
        where = {id(s): i for i, s in enumerate(self._batch)}
        index = torch.tensor([where[id(s)] for s in rows], dtype=torch.long, device=self.device)
        self._last = self._last.index_select(0, index)
        self._batch = list(rows)

    # ---------------------------------------------------------------- prompts

    def _complete_prefills(
        self, chunks: list[PrefillChunk], full: dict, events: Events
    ) -> list[tuple[Sequence, dict[str, torch.Tensor]]]:
        """The rows of requests whose prefill this step completed, each with its models'
        last logits (their first token's, or a resumed row's next)."""
        joined: list[tuple[Sequence, dict[str, torch.Tensor]]] = []
        for state in {id(c.state): c.state for c in chunks if c.last}.values():
            self.scheduler.drop_prefilling(state)
            if state.resumed:
                rows = [(t.row, t.last_logits) for t in state.targets]
                for t in state.targets:
                    t.row.slots = t.slots
                state.resumed, state.targets = [], []
            else:
                target = state.targets[0]
                if state.params.prompt_logprobs is not None:
                    lps = {m: full[(m, id(target))] for m in state.models}
                    state.prompt_lp, state.prompt_trace = prompt_logprobs(
                        state.req.prompt_ids[state.models[0]],
                        state.req.composition.coeffs,
                        lps,
                        state.params,
                        self.vocab_size,
                        self.device,
                    )
                if state.params.max_tokens == 0:
                    events += self._end_unfinished(state, "length")
                    self._free_targets(state)
                    continue
                try:
                    rows = [(s, target.last_logits) for s in self._new_rows(state, target)]
                except Exception as exc:  # noqa: BLE001 - e.g. no block for a sibling's copy
                    log.exception("starting the rows of %s failed", state.rid)
                    events += self._end_unfinished(state, "error", f"engine step failed: {exc}")
                    self._free_targets(state)
                    continue
                state.targets = []
            self.scheduler.joined(state, [s for s, _ in rows])
            joined += rows
        return joined

    def _new_rows(self, state: RequestState, target: Prefill) -> list[Sequence]:
        """The n sibling rows of a prompt just completed: the first keeps the prompt's KV, the
        others share its full blocks (and copy the last, partial one)."""
        p = state.params
        copies: dict[str, list[int]] = {}
        try:
            for name, slot in target.slots.items():
                copies[name] = self.runners[name].fork(slot, p.n - 1)
        except BaseException:
            for name, dst in copies.items():  # the siblings' KV must not leak
                for d in dst:
                    self.runners[name].free(d)
            raise
        rows = []
        for i in range(p.n):
            slots = {
                name: (slot if i == 0 else copies[name][i - 1])
                for name, slot in target.slots.items()
            }
            gen = None
            if p.seed is not None:
                # Siblings of a seeded request get distinct but reproducible streams.
                gen = torch.Generator(device=self.device).manual_seed(
                    (p.seed * 1_000_003 + i) % (2**63)
                )
            detok = IncrementalDetokenizer(self.family.tokenizer, p.stop, p.skip_special_tokens)
            seq = Sequence(state, i, p, detok, gen, slots)
            if p.grammar is not None:
                seq.matcher = self.grammars.matcher(p.grammar)
            rows.append(seq)
        target.slots = {}  # now owned by the rows
        return rows

    def _first_token_parts(
        self, joined: list[tuple[Sequence, dict[str, torch.Tensor]]], offset: int
    ) -> list[Part]:
        parts: list[Part] = []
        for name in self.runners:
            idx = [
                i
                for i, (s, logits) in enumerate(joined)
                if name in logits and name in s.request.req.composition.coeffs
            ]
            if not idx:
                continue
            lp = log_probs(
                torch.stack([joined[i][1][name] for i in idx]).to(self.device), self.vocab_size
            )
            coef = [joined[i][0].request.req.composition.coeffs[name] for i in idx]
            parts.append((
                name,
                torch.tensor([i + offset for i in idx], device=self.device),
                torch.tensor(coef, dtype=torch.float32, device=self.device),
                lp,
            ))  # fmt: skip
        return parts

    # ---------------------------------------------------------------- KV and endings

    def _retire(self) -> None:
        """Drop finished rows from the batch and free their KV."""
        for seq in self.scheduler.retire():
            self.scheduler.free_row(seq)
            self.spec_policy.forget(seq)

    def _free_targets(self, state: RequestState, scrub: bool = False) -> None:
        for target in state.targets:
            self.scheduler.free_target(target, scrub)

    def _cancel(self, rids: set[str]) -> None:
        """Abort these requests wherever they are: waiting, prefilling, or running."""
        events: Events = []
        sched = self.scheduler
        for state in [s for s in sched.waiting if s.rid in rids]:
            sched.waiting.remove(state)
            self._dequeued(state.params.n)
            events += self._end_unfinished(state, "abort")
            self._free_targets(state)
        for state in [s for s in sched.prefilling if s.rid in rids]:
            sched.drop_prefilling(state)
            self._free_targets(state)
            events += self._end_unfinished(state, "abort")
        for seq in sched.running:
            if seq.request.rid in rids:
                events.append((seq.request, seq.finish("abort")))
        self._retire()
        self._deliver(events)
        if events:
            stats = StepStats(0, 0, 0)
            self._finish_stats(stats, events, None)

    def _abort_all(self, message: str, reason: str = "abort", keep_waiting: bool = False) -> None:
        """Finish every request with `reason`: on shutdown, when the thread dies, or (with
        `keep_waiting`) every request a failed step may have touched. Must not raise."""
        sched = self.scheduler
        events: Events = []
        unstarted = sched.prefilling + ([] if keep_waiting else list(sched.waiting))
        for state in unstarted:
            events += self._end_unfinished(state, reason, message)
        for seq in sched.running:
            events.append((seq.request, seq.finish(reason, message)))
        if not keep_waiting:
            self._dequeued(_seqs(sched.waiting))
            sched.waiting.clear()
        self._deliver(events)
        # The rows' state may be what broke: start over with empty pools.
        sched.prefilling, sched.running = [], []
        self._batch, self._sampler_rows, self._member_rows = [], [], None
        self._last = self._last[:0]
        try:
            for runner, _ in self.groups:
                runner.reset()
            for state in sched.waiting:  # their handles (if any) went with the reset
                for target in state.targets:
                    target.slots, target.cursor, target.looked_up = {}, {}, False
        except Exception:  # noqa: BLE001
            log.exception("could not reset the KV pools")

    def _end_unfinished(self, state: RequestState, reason: str, error: str | None = None) -> Events:
        """The final events of a request that is not decoding: its n siblings (none started),
        or the rows it was preempted with (each continues its own stream)."""
        if state.resumed:
            return [(state, s.finish(reason, error)) for s in state.resumed]
        return [
            (
                state,
                SequenceOutput(
                    request_id=state.rid,
                    index=i,
                    finish_reason=reason,
                    error=error,
                    prompt_logprobs=state.prompt_lp if i == 0 else None,
                    prompt_trace=state.prompt_trace if i == 0 else None,
                ),
            )
            for i in range(state.params.n)
        ]

    # ---------------------------------------------------------------- reporting

    def _dequeued(self, count: int) -> None:
        """Sequences left the waiting queue (a negative count: preempted ones came back)."""
        if count:
            with self._lock:
                self._num_waiting -= count

    def _finish_stats(self, stats: StepStats, events: Events, t_start: float | None) -> None:
        """Fill in what every observer call carries (finished requests, queue, KV use)."""
        for state, out in events:
            if out.finish_reason is None:
                continue
            state.reasons.append(out.finish_reason)
            if len(state.reasons) == state.params.n:
                for reason in ("error", "abort", "length", "stop"):
                    if reason in state.reasons:
                        stats.finished.append((state.rid, reason))
                        break
        stats.num_running = self.num_running
        stats.num_waiting = self._num_waiting
        if t_start is not None:
            stats.step_seconds = time.perf_counter() - t_start
        used = total = 0
        for runner, names in self.groups:
            held = runner.tokens_by_owner()
            for name in names:
                stats.kv_cache_tokens[name] = held.get(name, 0)
                # Members share their runner's pool: its bytes count once, under its name.
                first = name == runner.name
                stats.kv_cache_bytes[name] = runner.nbytes() if first else 0
                stats.kv_cache_capacity_bytes[name] = runner.capacity_bytes() if first else 0
            used += runner.pool.num_used
            total += runner.pool.capacity
        stats.kv_cache_usage = used / total if total else 0.0
        if self.on_step is not None:
            self.on_step(stats)

    def _deliver(self, events: Events) -> None:
        if not events:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for state, out in events:
            by_loop.setdefault(state.loop, []).append((state.queue, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass


def _put_all(items: list[tuple[asyncio.Queue, SequenceOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)


def _seqs(states: Iterable[RequestState]) -> int:
    """Sequences of these requests, as the waiting queue counts them."""
    return sum(s.params.n for s in states)


def release_freed_memory() -> None:
    """Hand memory that freed tensors left in the C heap back to the OS (glibc's
    `malloc_trim`). Without it a CPU server's resident size stays at its peak after a burst of
    long sequences although the KV buffers are gone (measured: 2.97 GB after load, 1.94 GB
    after the trim, on the bench's perf family). The trim walks the heap (~0.1 s there), so
    the engine calls it once it has been idle for `TRIM_AFTER_IDLE_S`, not between requests.
    A no-op where there is no glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
