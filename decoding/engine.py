"""The engine: a scheduler and step loop that owns every model's state, behind an async API.

One background thread runs `step()` while there is work. A step:

  1. takes in new requests and cancellations (`_drain_inbox`);
  2. decodes one token for every running row: each model forwards only the rows whose
     composition uses it (`_decode_parts`);
  3. prefills newly admitted requests within a token budget; a prompt longer than the budget is
     prefilled in chunks, one per step, so decoding of the others never stalls for long
     (`_admit`, `_advance_chunk`);
  4. combines the per-model log-probs row by row (`composition.combine`), applies the
     conservative-decoding filters, and samples (`sampling.sample`): one host sync per step;
  5. appends tokens, detokenizes, checks stop conditions, emits events (`_postprocess`);
  6. merges the new rows into each model's batch and drops finished ones (`ModelBatch`).

Callers live on an asyncio loop: `submit()` returns an async iterator of `SequenceOutput`, fed
through `loop.call_soon_threadsafe`; leaving the iterator early cancels the request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from .composition import combine, log_probs, nucleus_mask, plausibility_mask
from .detokenizer import IncrementalDetokenizer
from .family import Family
from .kvcache import ModelBatch
from .request import (
    Composition,
    EngineDeadError,
    GenerationRequest,
    QueueFullError,
    RequestValidationError,
    SamplingParams,
    SequenceOutput,
    StepStats,
    TokenLogprob,
)
from .sampling import BatchSampling, apply_penalties, sample

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_batch_size: int = 32  # sequences decoding together (n siblings count separately)
    max_waiting: int = 256  # requests queued for admission; beyond it submit() refuses
    max_prefill_tokens: int = 512  # prompt tokens prefilled per step; longer prompts are chunked
    seed: int = 0  # of the generator shared by unseeded requests
    idle_wait_s: float = 0.5  # how long the idle loop sleeps between checks for shutdown


@dataclass(eq=False)
class _Request:
    """Engine-side state of one submitted request."""

    req: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    models: list[str]  # models its composition uses, in family order
    cost: int  # prompt tokens to prefill (longest per-model prompt)
    done: int = 0  # siblings finished (consumer side)
    cancelled: bool = False
    chunks: dict[str, ModelBatch] = field(default_factory=dict)  # chunked prefill in progress
    cursor: dict[str, int] = field(default_factory=dict)
    last_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    prompt_lp: list[TokenLogprob | None] | None = None  # echo scoring, sent with the 1st token
    reasons: list[str] = field(default_factory=list)

    @property
    def rid(self) -> str:
        return self.req.request_id


@dataclass(eq=False)
class _Seq:
    """One running row: a sibling sequence of a request."""

    request: _Request
    index: int
    params: SamplingParams
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    output: list[int] = field(default_factory=list)
    finished: bool = False


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
        self._shared_gen = torch.Generator(device=self.device).manual_seed(self.config.seed)
        # Inbox: the only state shared with the caller's thread.
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: deque[tuple[str, object]] = deque()
        self._num_waiting = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._dead: str | None = None
        # Step-loop state (engine thread only).
        self._waiting: deque[_Request] = deque()
        self._chunking: _Request | None = None
        self._rows: list[_Seq] = []
        self._batches = {name: ModelBatch(m) for name, m in family.models.items()}
        self._last_tokens = torch.zeros(0, dtype=torch.long, device=self.device)
        self._dirty = True  # batch membership changed: per-row tensors need a rebuild
        self._num_running = 0

    # ----------------------------------------------------------------- caller side (asyncio)

    @property
    def num_running(self) -> int:
        return self._num_running

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
        if self._dead or self._stopping:
            raise EngineDeadError(self._dead or "the engine is shutting down")
        state = self._validate(req)
        with self._lock:
            if self._num_waiting >= self.config.max_waiting:
                raise QueueFullError(
                    f"the server is at capacity ({self.config.max_waiting} requests waiting)"
                )
            self._num_waiting += 1
            self._inbox.append(("submit", state))
        self._wake.set()
        self.start()
        return self._stream(state)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("cancel", request_id))
        self._wake.set()

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what is left and stop the step loop (bounded by `timeout`)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout)

    async def _stream(self, state: _Request) -> AsyncIterator[SequenceOutput]:
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

    def _validate(self, req: GenerationRequest) -> _Request:
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
        cost = max(len(req.prompt_ids[m]) for m in models)
        return _Request(req, asyncio.get_running_loop(), asyncio.Queue(), models, cost)

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            while True:
                self._drain_inbox()
                if self._stopping:
                    self._abort_all("the engine is shutting down")
                    return
                if not (self._rows or self._waiting or self._chunking):
                    self._wake.wait(self.config.idle_wait_s)
                    self._wake.clear()
                    continue
                try:
                    self.step()
                except Exception as exc:  # a bug or OOM fails the batch, not the server
                    log.exception("engine step failed")
                    self._abort_all(f"engine step failed: {exc}", reason="error")
        except BaseException as exc:  # pragma: no cover - last resort
            self._dead = f"the engine stopped: {exc}"
            log.exception("engine thread died")
            raise

    def _drain_inbox(self) -> None:
        with self._lock:
            items = list(self._inbox)
            self._inbox.clear()
        cancelled = set()
        for kind, value in items:
            if kind == "submit":
                self._waiting.append(value)  # type: ignore[arg-type]
            else:
                cancelled.add(value)
        if cancelled:
            self._cancel(cancelled)

    def _cancel(self, rids: set[str]) -> None:
        events: list[tuple[_Request, SequenceOutput]] = []
        for state in [s for s in self._waiting if s.rid in rids]:
            self._waiting.remove(state)
            self._dequeued(1)
            events += self._finish_unstarted(state, "abort")
        if self._chunking is not None and self._chunking.rid in rids:
            events += self._finish_unstarted(self._chunking, "abort")
            self._chunking = None
        keep = []
        for i, seq in enumerate(self._rows):
            if seq.request.rid in rids:
                seq.finished = True
                events.append((seq.request, self._final(seq, "abort")))
            else:
                keep.append(i)
        if len(keep) != len(self._rows):
            self._keep_rows(keep)
        self._deliver(events)
        if events:
            self._report_finished(events)

    def _abort_all(self, message: str, reason: str = "abort") -> None:
        events = []
        for state in list(self._waiting) + ([self._chunking] if self._chunking else []):
            events += self._finish_unstarted(state, reason, message)
        self._dequeued(len(self._waiting))
        self._waiting.clear()
        self._chunking = None
        for seq in self._rows:
            events.append((seq.request, self._final(seq, reason, message)))
        self._keep_rows([])
        self._deliver(events)

    def _dequeued(self, count: int) -> None:
        with self._lock:
            self._num_waiting -= count

    # ------------------------------------------------------------------------ one step

    @torch.inference_mode()
    def step(self) -> None:
        t_start = time.perf_counter()
        stats = StepStats(batch_size=0, num_running=0, num_waiting=0)
        self._new_batches, self._new_src = {}, {}
        n_run = len(self._rows)
        parts = self._decode_parts(stats) if n_run else []
        admitted = self._admit(stats)
        new_rows, prompt_events = self._prefill(admitted, n_run, parts, stats)
        rows = self._rows + new_rows
        events = list(prompt_events)
        if rows:
            if self._dirty or new_rows:
                self._rebuild(rows)
            t0 = time.perf_counter()
            composed = combine(len(rows), [(i, c, lp) for _, i, c, lp in parts])
            stats.combine_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            tokens, chosen, top, on_device = self._sample(rows, composed, parts)
            stats.sample_seconds = time.perf_counter() - t0
            events += self._postprocess(rows, tokens, chosen, top)
            stats.batch_size = len(rows)
            stats.generated_tokens = len(rows)
            self._merge(new_rows, on_device)
        self._deliver(events)
        self._report_finished(events, stats)
        stats.num_running = self._num_running
        stats.num_waiting = self._num_waiting
        stats.step_seconds = time.perf_counter() - t_start
        for name, batch in self._batches.items():
            stats.kv_cache_tokens[name] = batch.num_tokens()
            stats.kv_cache_bytes[name] = batch.nbytes()
        if self.on_step is not None:
            self.on_step(stats)

    def _decode_parts(
        self, stats: StepStats
    ) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Forward every running row's last token through each model it uses."""
        if self._dirty:
            self._rebuild(self._rows)
        parts = []
        for name, (idx, coef) in self._row_index.items():
            t0 = time.perf_counter()
            logits = self._batches[name].forward(
                self._last_tokens.index_select(0, idx).unsqueeze(-1)
            )
            lp = log_probs(logits[:, -1].to(self.device), self.vocab_size)
            parts.append((name, idx, coef, lp))
            stats.forward_seconds[name] = time.perf_counter() - t0
        return parts

    def _admit(self, stats: StepStats) -> list[_Request]:
        """Requests whose prefill completes this step, within the prefill token budget."""
        budget = self.config.max_prefill_tokens
        if self._chunking is not None:
            state = self._chunking
            if self._advance_chunk(state, stats):
                self._chunking = None
                return [state]
            return []
        admitted: list[_Request] = []
        used = 0
        rows = len(self._rows)
        while self._waiting:
            state = self._waiting[0]
            if rows + state.req.params.n > self.config.max_batch_size:
                break
            if used + state.cost > budget:
                if admitted:
                    break
                # Alone and over budget: chunk it over the next steps. Prompt log-probs need
                # every position's logits at once, so such a request is prefilled whole.
                if state.req.params.prompt_logprobs is None:
                    self._chunking = self._pop_waiting()
                    self._advance_chunk(self._chunking, stats)
                    break
            admitted.append(self._pop_waiting())
            used += state.cost
            rows += state.req.params.n
        return admitted

    def _pop_waiting(self) -> _Request:
        self._dequeued(1)
        return self._waiting.popleft()

    def _advance_chunk(self, state: _Request, stats: StepStats) -> bool:
        """Prefill the next chunk of a long prompt for every model; True when all are done."""
        size = self.config.max_prefill_tokens
        done = True
        longest = 0
        for name in state.models:
            prompt = state.req.prompt_ids[name]
            start = state.cursor.get(name, 0)
            if start >= len(prompt):
                continue
            batch = state.chunks.setdefault(name, ModelBatch(self.family.models[name]))
            t0 = time.perf_counter()
            logits = batch.forward([prompt[start : start + size]])
            stats.forward_seconds[name] = stats.forward_seconds.get(name, 0.0) + (
                time.perf_counter() - t0
            )
            state.cursor[name] = start + size
            state.last_logits[name] = logits[:, -1]
            done = done and start + size >= len(prompt)
            longest = max(longest, min(size, len(prompt) - start))
        stats.prompt_tokens += longest
        return done

    def _prefill(
        self,
        admitted: list[_Request],
        n_run: int,
        parts: list,
        stats: StepStats,
    ) -> tuple[list[_Seq], list[tuple[_Request, SequenceOutput]]]:
        """Prefill admitted requests (one forward per model), add their first-token log-probs
        to `parts` at rows after the running ones, and return their new sequences."""
        if not admitted:
            return [], []
        new_batches: dict[str, ModelBatch] = {}
        last: dict[str, torch.Tensor] = {}  # model -> [requests using it, V] last-position logits
        full: dict[tuple[str, int], torch.Tensor] = {}  # (model, request) -> [T, V] for echo
        for name in self.family.models:
            users = [s for s in admitted if name in s.models]
            if not users:
                continue
            fresh = [s for s in users if not s.chunks]
            keep_all = any(s.req.params.prompt_logprobs is not None for s in fresh)
            chunks: list[torch.Tensor] = []
            if fresh:
                batch = ModelBatch(self.family.models[name])
                t0 = time.perf_counter()
                logits = batch.forward(
                    [s.req.prompt_ids[name] for s in fresh], logits_to_keep=0 if keep_all else 1
                )
                stats.forward_seconds[name] = stats.forward_seconds.get(name, 0.0) + (
                    time.perf_counter() - t0
                )
                for j, s in enumerate(fresh):
                    if s.req.params.prompt_logprobs is not None:
                        full[(name, id(s))] = logits[j, -len(s.req.prompt_ids[name]) :]
                chunks.append(logits[:, -1])
                new_batches[name] = batch
            for s in users:  # chunk-prefilled requests bring their own single-row batch
                if s.chunks:
                    chunks.append(s.last_logits[name])
                    if name in new_batches:
                        new_batches[name].extend(s.chunks[name])
                    else:
                        new_batches[name] = s.chunks[name]
            last[name] = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
            # Keep `new_batches[name]` rows in the order of `users`: fresh first, then chunked.
        stats.prompt_tokens += sum(s.cost for s in admitted if not s.chunks)
        self._new_batches = new_batches

        new_rows: list[_Seq] = []
        events: list[tuple[_Request, SequenceOutput]] = []
        order = {name: self._prefill_order(admitted, name) for name in last}
        for s in admitted:
            plp = (
                self._prompt_logprobs(s, full) if s.req.params.prompt_logprobs is not None else None
            )
            if s.req.params.max_tokens == 0:
                events += self._finish_unstarted(s, "length", prompt_logprobs=plp)
                continue
            s.prompt_lp = plp
            for i in range(s.req.params.n):
                new_rows.append(self._new_seq(s, i))
        for name, logits in last.items():
            lp = log_probs(logits.to(self.device), self.vocab_size)
            src, dst = [], []
            for k, seq in enumerate(new_rows):
                if name in seq.request.models:
                    src.append(order[name][id(seq.request)])
                    dst.append(n_run + k)
            if not dst:
                continue
            src_t = torch.tensor(src, device=self.device)
            coef = torch.tensor(
                [new_rows[d - n_run].request.req.composition.coeffs[name] for d in dst],
                device=self.device,
            )
            dst_t = torch.tensor(dst, device=self.device)
            parts.append((name, dst_t, coef, lp.index_select(0, src_t)))
        self._new_src = {
            name: [order[name][id(seq.request)] for seq in new_rows if name in seq.request.models]
            for name in last
        }
        return new_rows, events

    @staticmethod
    def _prefill_order(admitted: list[_Request], name: str) -> dict[int, int]:
        """Row of each request in the model's prefill batch: fresh ones first, then chunked."""
        users = [s for s in admitted if name in s.models]
        ordered = [s for s in users if not s.chunks] + [s for s in users if s.chunks]
        return {id(s): j for j, s in enumerate(ordered)}

    def _new_seq(self, state: _Request, index: int) -> _Seq:
        p = state.req.params
        gen = None
        if p.seed is not None:
            # Siblings of a seeded request get distinct but reproducible streams.
            gen = torch.Generator(device=self.device).manual_seed(
                (p.seed * 1_000_003 + index) % (2**63)
            )
        detok = IncrementalDetokenizer(self.family.tokenizer, p.stop, p.skip_special_tokens)
        return _Seq(state, index, p, detok, gen)

    def _prompt_logprobs(
        self, state: _Request, full: dict[tuple[str, int], torch.Tensor]
    ) -> list[TokenLogprob | None]:
        """Log-prob of every prompt token under the composed distribution (echo scoring)."""
        coeffs = state.req.composition.coeffs
        t = len(state.req.prompt_ids[state.models[0]])
        parts = []
        zero = torch.zeros(t, dtype=torch.long, device=self.device)
        for name in state.models:
            lp = log_probs(full[(name, id(state))].to(self.device), self.vocab_size)
            parts.append((torch.arange(t, device=self.device), zero.float() + coeffs[name], lp))
        composed = combine(t, parts)
        ids = state.req.prompt_ids[state.models[0]]
        k = state.req.params.prompt_logprobs or 0
        target = torch.tensor(ids[1:], device=self.device)
        chosen = composed[:-1].gather(1, target.unsqueeze(-1)).squeeze(-1).tolist()
        top_v, top_i = composed[:-1].topk(max(k, 1), dim=-1)
        top_v, top_i = top_v[:, :k].tolist(), top_i[:, :k].tolist()
        out: list[TokenLogprob | None] = [None]
        for j, tok in enumerate(ids[1:]):
            out.append(TokenLogprob(tok, chosen[j], list(zip(top_i[j], top_v[j]))))
        return out

    def _rebuild(self, rows: list[_Seq]) -> None:
        """Per-row tensors for a new batch membership: model row indices, coefficients,
        sampling parameters, filters."""
        dev = self.device
        self._row_index = {}
        for name in self.family.models:
            members = [i for i, s in enumerate(rows) if name in s.request.models]
            if members:
                coef = [rows[i].request.req.composition.coeffs[name] for i in members]
                self._row_index[name] = (
                    torch.tensor(members, device=dev),
                    torch.tensor(coef, dtype=torch.float32, device=dev),
                )
        self._sampling = BatchSampling.build(
            [s.params for s in rows], [s.generator for s in rows], self.vocab_size, dev
        )
        comps = [s.request.req.composition for s in rows]
        top_p_rows = [i for i, c in enumerate(comps) if c.base_top_p is not None]
        plaus_rows = [i for i, c in enumerate(comps) if c.plausibility]
        self._filters = None
        if top_p_rows or plaus_rows:
            mix = {}  # expert -> weights of the normalised expert mixture per plausibility row
            for i in plaus_rows:
                c = comps[i]
                total = sum(c.coeffs[e] for e in c.experts)
                for e in c.experts:
                    mix.setdefault(e, [0.0] * len(plaus_rows))[plaus_rows.index(i)] = (
                        c.coeffs[e] / total if total else 0.0
                    )
            self._filters = {
                "top_p_rows": torch.tensor(top_p_rows, device=dev),
                "top_p": torch.tensor([comps[i].base_top_p for i in top_p_rows], device=dev),
                "plaus_rows": torch.tensor(plaus_rows, device=dev),
                "alpha": torch.tensor([comps[i].plausibility for i in plaus_rows], device=dev),
                "mix": {e: torch.tensor(w, device=dev) for e, w in mix.items()},
                "base": comps[(top_p_rows or plaus_rows)[0]].base,
            }
        self._dirty = False

    def _sample(
        self, rows: list[_Seq], composed: torch.Tensor, parts: list
    ) -> tuple[list[int], list[float] | None, list[list[tuple[int, float]]] | None, torch.Tensor]:
        bs = self._sampling
        scores = composed
        if self._filters is not None:
            scores = scores.masked_fill(self._filter_mask(len(rows), parts), -torch.inf)
        pending = [(i, s) for i, s in enumerate(rows) if len(s.output) < s.params.min_tokens]
        if pending:  # min_tokens: EOS and stop token ids cannot be sampled yet
            r, c = [], []
            for i, s in pending:
                banned = set(s.params.stop_token_ids)
                if not s.params.ignore_eos:
                    banned |= self.family.eos_token_ids
                for tok in banned:
                    if 0 <= tok < self.vocab_size:
                        r.append(i)
                        c.append(tok)
            if r:
                where = (torch.tensor(r, device=self.device), torch.tensor(c, device=self.device))
                scores = scores.index_put(where, torch.tensor(-torch.inf, device=self.device))
        if bs.penalty_rows:
            prompts = [_first_prompt(rows[i]) for i in bs.penalty_rows]
            scores = apply_penalties(scores, bs, prompts, [rows[i].output for i in bs.penalty_rows])
        tokens = sample(scores, bs, self._shared_gen)
        # A non-finite row (a model emitted NaN/inf) is marked -1 and fails alone.
        bad = ~torch.isfinite(composed).all(dim=-1)
        tokens = torch.where(bad, torch.full_like(tokens, -1), tokens)
        token_list = tokens.tolist()  # the step's one device -> host sync
        if bs.max_logprobs < 0:
            return token_list, None, None, tokens
        safe = tokens.clamp_min(0).unsqueeze(-1)
        chosen = composed.gather(1, safe).squeeze(-1).tolist()
        k = bs.max_logprobs
        top_v, top_i = composed.topk(max(k, 1), dim=-1)
        tops = [list(zip(i[:k], v[:k])) for i, v in zip(top_i.tolist(), top_v.tolist())]
        return token_list, chosen, tops, tokens

    def _filter_mask(self, batch: int, parts: list) -> torch.Tensor:
        """Conservative decoding: True for tokens outside the base nucleus / plausible set."""
        f = self._filters
        base_full = torch.zeros(batch, self.vocab_size, device=self.device)
        expert_full: dict[str, torch.Tensor] = {}
        for name, idx, _, lp in parts:
            if name == f["base"]:
                base_full.index_copy_(0, idx, lp)
            elif name in f["mix"]:
                expert_full.setdefault(
                    name, torch.zeros(batch, self.vocab_size, device=self.device)
                ).index_copy_(0, idx, lp)
        mask = torch.zeros(batch, self.vocab_size, dtype=torch.bool, device=self.device)
        if len(f["top_p_rows"]):
            rows = f["top_p_rows"]
            mask[rows] |= nucleus_mask(base_full[rows], f["top_p"])
        if len(f["plaus_rows"]):
            rows = f["plaus_rows"]
            base = base_full[rows]
            if f["mix"]:
                mix = sum(w.unsqueeze(-1) * expert_full[e][rows] for e, w in f["mix"].items())
                # Rows whose experts all weigh 0 fall back to the base alone.
                empty = sum(f["mix"].values()) == 0
                mix = torch.where(empty.unsqueeze(-1), base, torch.log_softmax(mix, dim=-1))
            else:
                mix = base
            mask[rows] |= plausibility_mask(base, mix, f["alpha"])
        return mask

    def _postprocess(
        self,
        rows: list[_Seq],
        tokens: list[int],
        chosen: list[float] | None,
        tops: list[list[tuple[int, float]]] | None,
    ) -> list[tuple[_Request, SequenceOutput]]:
        events = []
        eos = self.family.eos_token_ids
        for i, seq in enumerate(rows):
            tok = tokens[i]
            p = seq.params
            if tok < 0:
                seq.finished = True
                events.append(
                    (
                        seq.request,
                        self._final(
                            seq,
                            "error",
                            "the composed distribution is not finite (NaN or inf log-probs)",
                        ),
                    )
                )
                continue
            seq.output.append(tok)
            out = SequenceOutput(
                request_id=seq.request.rid,
                index=seq.index,
                token_ids=[tok],
                num_prompt_tokens=seq.request.cost,
                num_generated_tokens=len(seq.output),
            )
            if chosen is not None and p.logprobs is not None:
                out.logprobs = [TokenLogprob(tok, chosen[i], tops[i][: p.logprobs])]
            if len(seq.output) == 1:
                out.prompt_logprobs = seq.request.prompt_lp if seq.index == 0 else None
            if tok in eos and not p.ignore_eos:
                out.finish_reason = "stop"
            elif tok in p.stop_token_ids:
                out.finish_reason, out.stop_reason = "stop", tok
            else:
                out.text, hit = seq.detok.add(tok)
                if hit is not None:
                    out.finish_reason, out.stop_reason = "stop", hit
            if out.finish_reason is None and len(seq.output) >= p.max_tokens:
                out.finish_reason = "length"
            if out.finish_reason is not None:
                out.text += seq.detok.flush() if out.stop_reason is None else ""
                seq.finished = True
            events.append((seq.request, out))
        return events

    def _merge(self, new_rows: list[_Seq], tokens: torch.Tensor) -> None:
        """Add the new rows to every model's batch, then drop finished rows everywhere.

        `tokens` (on the device) are the next decode step's inputs: no host round trip.
        """
        if new_rows:
            for name, batch in self._new_batches.items():
                batch.select(self._new_src[name])  # one row per sibling
                self._batches[name].extend(batch)
            # `_rebuild` already ran for exactly these rows this step: the tensors stay valid.
            self._rows = self._rows + new_rows
        self._last_tokens = tokens.clamp_min(0)
        keep = [i for i, s in enumerate(self._rows) if not s.finished]
        if len(keep) != len(self._rows):
            self._keep_rows(keep)
        self._num_running = len({id(s.request) for s in self._rows})
        self._new_batches, self._new_src = {}, {}

    def _keep_rows(self, keep: list[int]) -> None:
        """Drop every row not in `keep` from the batch and from each model's cache."""
        for name, batch in self._batches.items():
            members = [i for i, s in enumerate(self._rows) if name in s.request.models]
            if not members:
                continue
            position = {row: j for j, row in enumerate(members)}
            batch.select([position[i] for i in keep if i in position])
        self._rows = [self._rows[i] for i in keep]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._last_tokens = self._last_tokens.index_select(0, index)
        self._num_running = len({id(s.request) for s in self._rows})
        self._dirty = True

    # ------------------------------------------------------------------------ events

    def _final(self, seq: _Seq, reason: str, error: str | None = None) -> SequenceOutput:
        seq.finished = True
        return SequenceOutput(
            request_id=seq.request.rid,
            index=seq.index,
            text=seq.detok.flush() if reason != "error" else "",
            finish_reason=reason,
            error=error,
            num_prompt_tokens=seq.request.cost,
            num_generated_tokens=len(seq.output),
        )

    def _finish_unstarted(
        self,
        state: _Request,
        reason: str,
        error: str | None = None,
        prompt_logprobs: list[TokenLogprob | None] | None = None,
    ) -> list[tuple[_Request, SequenceOutput]]:
        return [
            (
                state,
                SequenceOutput(
                    request_id=state.rid,
                    index=i,
                    finish_reason=reason,
                    error=error,
                    prompt_logprobs=prompt_logprobs if i == 0 else None,
                    num_prompt_tokens=state.cost,
                ),
            )
            for i in range(state.req.params.n)
        ]

    def _deliver(self, events: list[tuple[_Request, SequenceOutput]]) -> None:
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

    def _report_finished(
        self, events: list[tuple[_Request, SequenceOutput]], stats: StepStats | None = None
    ) -> None:
        """Record each request's outcome once its last sibling has finished."""
        finished = []
        for state, out in events:
            if out.finish_reason is None:
                continue
            state.reasons.append(out.finish_reason)
            if len(state.reasons) == state.req.params.n:
                for reason in ("error", "abort", "length", "stop"):
                    if reason in state.reasons:
                        finished.append((state.rid, reason))
                        break
        if stats is not None:
            stats.finished += finished
        elif finished and self.on_step is not None:
            self.on_step(StepStats(0, self._num_running, self._num_waiting, finished=finished))


def _put_all(items: list[tuple[asyncio.Queue, SequenceOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)


def _first_prompt(seq: _Seq) -> list[int]:
    return seq.request.req.prompt_ids[seq.request.models[0]]
