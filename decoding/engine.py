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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch

from .composition import log_probs
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .errors import FamilyError
from .family import Family
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
from .scheduler import PrefillChunk, Scheduler
from .sequence import RequestState, Sequence
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
        self._num_waiting = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._dead: str | None = None
        # Everything below belongs to the engine thread.
        self.scheduler = Scheduler(self.config)
        # One runner per set of weights; the entries sharing it (a model and its adapters)
        # are its members, with their own slots, and run as one forward.
        self.runners: dict[str, ModelRunner] = {}
        for names in weight_groups(family):
            try:
                runner = ModelRunner(
                    [family.models[n] for n in names], self.config.max_batch_size * len(names)
                )
                runner.self_check()
            except UnsupportedModelError as exc:
                raise FamilyError(f"model {names[0]!r}: {exc}") from exc
            self.runners.update(dict.fromkeys(names, runner))
        self.groups = unique_runners(self.runners)  # each runner once, with its members
        self.sampler = Sampler(
            family.vocab_size, family.device, family.eos_token_ids, self.config.seed
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
        self._member_rows: list[Sequence] = []
        self._members: dict[str, tuple[torch.Tensor, torch.Tensor, list[int]]] = {}

    # ----------------------------------------------------------------- caller side (asyncio)

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

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
        them or none. The queue bound is checked once per unit (a 5-prompt request is not refused
        for having more prompts than `max_waiting`), and nothing is refused while a batch slot
        is free."""
        if self._dead or self._stopping:
            raise EngineDeadError(self._dead or "the engine is shutting down")
        states = [self._validate(req) for req in reqs]
        with self._lock:
            full = self._num_waiting >= self.config.max_waiting
            slot_free = self.scheduler.num_running + self._num_waiting < self.config.max_batch_size
            if full and not slot_free:
                raise QueueFullError(
                    f"the server is at capacity ({self.config.max_waiting} requests waiting)"
                )
            self._num_waiting += len(states)
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
        if p.prompt_logprobs is not None and len({tuple(req.prompt_ids[m]) for m in models}) > 1:
            raise RequestValidationError(
                "prompt log-probs need the same prompt for every model", param="echo"
            )
        draft = self._draft_for(req)  # its slot comes at the row's first speculative block
        cost = max(len(req.prompt_ids[m]) for m in models)
        return RequestState(
            req, asyncio.get_running_loop(), asyncio.Queue(), models, cost, draft=draft
        )

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
        """One step: prefill chunks and decode rows, sample, post-process, deliver."""
        t_start = time.perf_counter()
        plan, admitted = self.scheduler.schedule()
        self._dequeued(len(admitted))
        stats = StepStats(batch_size=0, num_running=0, num_waiting=0)
        events: Events = []
        joined, joined_parts = self._run_prefill(plan.prefill, stats, events)
        rows = plan.decode + joined
        # A step speculates when every row can (`eligible`) and the policy says so now.
        eligible = self._drafters(plan.decode) if not joined and not plan.prefill else None
        drafters = eligible if eligible and self.spec_policy.use(len(plan.decode)) else None
        if drafters is not None:
            self._speculate(plan.decode, drafters, stats, events)
        elif rows:
            try:
                parts = self._run_decode(plan.decode, stats) + [
                    (name, idx + len(plan.decode), coef, lp) for name, idx, coef, lp in joined_parts
                ]
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
            else:
                eos = self.family.eos_token_ids
                for i, seq in enumerate(rows):
                    out = seq.append(result.tokens[i], eos, result.logprobs[i], result.traces[i])
                    events.append((seq.request, out))
                self._batch, self._last = rows, result.on_device
                stats.batch_size = stats.generated_tokens = len(rows)
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

    def _fail_rows(self, rows: list[Sequence], exc: Exception) -> Events:
        """Fail the rows of a step that raised; the next step rebuilds the per-row state."""
        self._batch, self._sampler_rows = [], []
        self._last = self._last[:0]
        return [(s.request, s.fail(f"engine step failed: {exc}")) for s in rows]

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

    # ---------------------------------------------------------------- prefill

    def _run_prefill(
        self, chunks: list[PrefillChunk], stats: StepStats, events: Events
    ) -> tuple[list[Sequence], list[Part]]:
        """Forward this step's prompt chunks; the rows of prompts completed, with their
        first-token log-probs as parts (row indices counted from 0 among the new rows)."""
        if not chunks:
            return [], []
        try:
            full = self._forward_chunks(chunks, stats)
            done = [c.state for c in chunks if c.last]
            joined: list[Sequence] = []
            for state in done:
                if state.params.prompt_logprobs is not None:
                    lps = {m: full[(m, id(state))] for m in state.models}
                    state.prompt_lp, state.prompt_trace = prompt_logprobs(
                        state.req.prompt_ids[state.models[0]],
                        state.req.composition.coeffs,
                        lps,
                        state.params,
                        self.vocab_size,
                        self.device,
                    )
                self.scheduler.drop_prefilling(state)
                if state.params.max_tokens == 0:
                    events += self._finish_unstarted(state, "length")
                    self._free_request(state)
                    continue
                rows = self._new_rows(state)
                self.scheduler.joined(state, rows)
                joined += rows
            return joined, self._first_token_parts(joined)
        except Exception as exc:  # noqa: BLE001 - fails the prompts of this step only
            log.exception("prefill failed")
            for c in chunks:
                state = c.state
                self.scheduler.drop_prefilling(state)
                for seq in [s for s in self.scheduler.running if s.request is state]:
                    seq.finished = True
                    self._free_row(seq)
                self.scheduler.retire()
                self._free_request(state)
                events += self._finish_unstarted(state, "error", f"engine step failed: {exc}")
            return [], []

    def _forward_chunks(self, chunks: list[PrefillChunk], stats: StepStats) -> dict:
        """One forward per set of weights over its members' chunks; keeps each completed
        model's last logits. Returns the all-position logits of echo-scoring requests:
        (model, request) -> [T, V]."""
        full: dict[tuple[str, int], torch.Tensor] = {}
        for runner, names in self.groups:
            mine = {n: [c for c in chunks if n in c.spans] for n in names}
            mine = {n: cs for n, cs in mine.items() if cs}
            if not mine:
                continue
            for name, cs in mine.items():
                for c in cs:
                    if name not in c.state.slots:
                        c.state.slots[name] = runner.allocate(name)
            keep_all = any(c.state.params.prompt_logprobs is not None
                           for cs in mine.values() for c in cs)  # fmt: skip
            calls = {
                name: (
                    [c.state.slots[name] for c in cs],
                    [c.state.req.prompt_ids[name][slice(*c.spans[name])] for c in cs],
                )
                for name, cs in mine.items()
            }
            t0 = time.perf_counter()
            out = runner.prefill_many(calls, keep_all)
            stats.add_forward(runner.name, t0)
            for name, cs in mine.items():
                for j, c in enumerate(cs):
                    start, end = c.spans[name]
                    c.state.cursor[name] = end
                    c.state.last_logits[name] = (
                        out[name][j, end - start - 1] if keep_all else out[name][j]
                    )
                    if c.state.params.prompt_logprobs is not None:
                        full[(name, id(c.state))] = out[name][j, : end - start]
        stats.prompt_tokens += sum(c.tokens for c in chunks)
        return full

    def _new_rows(self, state: RequestState) -> list[Sequence]:
        """The n sibling rows of a prompt just completed: the first keeps the prefill slots,
        the others get copies of them."""
        p = state.params
        copies: dict[str, list[int]] = {}
        try:
            for name, slot in state.slots.items():
                copies[name] = self.runners[name].fork(slot, p.n - 1)
        except BaseException:
            for name, dst in copies.items():  # the siblings' slots must not leak
                for d in dst:
                    self.runners[name].free(d)
            raise
        rows = []
        for i in range(p.n):
            slots = {
                name: (slot if i == 0 else copies[name][i - 1])
                for name, slot in state.slots.items()
            }
            gen = None
            if p.seed is not None:
                # Siblings of a seeded request get distinct but reproducible streams.
                gen = torch.Generator(device=self.device).manual_seed(
                    (p.seed * 1_000_003 + i) % (2**63)
                )
            detok = IncrementalDetokenizer(self.family.tokenizer, p.stop, p.skip_special_tokens)
            rows.append(Sequence(state, i, p, detok, gen, slots))
        state.slots = {}  # now owned by the rows
        return rows

    def _first_token_parts(self, rows: list[Sequence]) -> list[Part]:
        parts: list[Part] = []
        for name in self.runners:
            idx = [
                i
                for i, s in enumerate(rows)
                if name in s.request.last_logits and name in s.request.req.composition.coeffs
            ]
            if not idx:
                continue
            lp = log_probs(
                torch.stack([rows[i].request.last_logits[name] for i in idx]).to(self.device),
                self.vocab_size,
            )
            coef = [rows[i].request.req.composition.coeffs[name] for i in idx]
            parts.append((
                name,
                torch.tensor(idx, device=self.device),
                torch.tensor(coef, dtype=torch.float32, device=self.device),
                lp,
            ))  # fmt: skip
        for s in rows:
            if s.index == s.params.n - 1:
                s.request.last_logits = {}
        return parts

    # ---------------------------------------------------------------- decode

    def _run_decode(self, rows: list[Sequence], stats: StepStats) -> list[Part]:
        """One token for every running row through each model it uses."""
        if not rows:
            return []
        if rows != self._member_rows:
            self._members = self._membership(rows)
            self._member_rows = rows
        parts: list[Part] = []
        for runner, names in self.groups:
            mine = [n for n in names if n in self._members]
            if not mine:
                continue
            calls = {}
            for n in mine:
                idx, _, slots = self._members[n]
                calls[n] = (slots, self._last.index_select(0, idx))
            t0 = time.perf_counter()
            out = runner.decode_many(calls)
            stats.add_forward(runner.name, t0)
            for n in mine:
                idx, coef, _ = self._members[n]
                parts.append((n, idx, coef, log_probs(out[n].to(self.device), self.vocab_size)))
        return parts

    def _membership(self, rows: list[Sequence]) -> dict:
        """Per model: the batch rows that use it, their coefficients and their slots."""
        out = {}
        for name in self.runners:
            idx = [i for i, s in enumerate(rows) if name in s.slots]
            if idx:
                coeffs = [rows[i].request.req.composition.coeffs[name] for i in idx]
                out[name] = (
                    torch.tensor(idx, device=self.device),
                    torch.tensor(coeffs, dtype=torch.float32, device=self.device),
                    [rows[i].slots[name] for i in idx],
                )
        return out

    def _retire(self) -> None:
        """Drop finished rows from the batch and free their slots; realign the next inputs."""
        batch = self._batch
        done = self.scheduler.retire()
        for seq in done:
            self._free_row(seq)
            self.spec_policy.forget(seq)
        if done and batch:
            keep = [i for i, s in enumerate(batch) if not s.finished]
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            self._last = self._last.index_select(0, index)
            self._batch = [batch[i] for i in keep]

    # ---------------------------------------------------------------- slots and endings

    def _free_row(self, seq: Sequence) -> None:
        for name, slot in seq.slots.items():
            self.runners[name].free(slot)
        seq.slots = {}
        if seq.draft_slot is not None:
            self.runners[seq.request.draft].free(seq.draft_slot)
            seq.draft_slot = None

    def _free_request(self, state: RequestState) -> None:
        for name, slot in state.slots.items():
            self.runners[name].free(slot)
        state.slots = {}
        state.last_logits = {}

    def _cancel(self, rids: set[str]) -> None:
        """Abort these requests wherever they are: waiting, prefilling, or running."""
        events: Events = []
        sched = self.scheduler
        for state in [s for s in sched.waiting if s.rid in rids]:
            sched.waiting.remove(state)
            self._dequeued(1)
            events += self._finish_unstarted(state, "abort")
        for state in [s for s in sched.prefilling if s.rid in rids]:
            sched.drop_prefilling(state)
            self._free_request(state)
            events += self._finish_unstarted(state, "abort")
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
            events += self._finish_unstarted(state, reason, message)
        for seq in sched.running:
            events.append((seq.request, seq.finish(reason, message)))
        if not keep_waiting:
            self._dequeued(len(sched.waiting))
            sched.waiting.clear()
        self._deliver(events)
        # The rows' state may be what broke: start over with fresh runners.
        sched.prefilling, sched.running = [], []
        self._batch, self._sampler_rows, self._member_rows = [], [], []
        self._last = self._last[:0]
        try:
            for runner, _ in self.groups:
                runner.reset()
        except Exception:  # noqa: BLE001
            log.exception("could not reset the KV slots")

    def _finish_unstarted(
        self, state: RequestState, reason: str, error: str | None = None
    ) -> Events:
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
        for name, runner in self.runners.items():
            stats.kv_cache_tokens[name] = runner.num_tokens(name)
            # Members share their runner's buffers: the bytes count once, under its name.
            stats.kv_cache_bytes[name] = runner.nbytes() if name == runner.name else 0
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
