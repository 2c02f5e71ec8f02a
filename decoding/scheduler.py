"""The scheduler and the step: everything the engine thread does with the batch.

`Scheduler.step()` runs one decoding step for every running row and admits waiting requests:

  1. decodes one token for every running row: each model forwards only the rows whose
     composition uses it (`_decode_parts`);
  2. prefills newly admitted requests within a token budget; a prompt longer than the budget is
     prefilled in chunks, one per step, so decoding of the others never stalls for long
     (`_admit`, `_advance_chunk`, `_prefill`);
  3. combines the per-model log-probs row by row (`composition.combine`), applies the
     conservative-decoding filters, and samples (`sampling.sample`): one host sync per step;
  4. appends tokens, detokenizes, checks stop conditions, emits events (`_postprocess`);
  5. merges the new rows into each model's batch and drops finished ones (`_merge`).

It is owned by one thread (the engine's); events leave through the `deliver` callback.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .composition import BatchFilters, combine, log_probs
from .detokenizer import IncrementalDetokenizer
from .family import Family
from .kvcache import ModelBatch
from .request import SequenceOutput, StepStats, TokenLogprob
from .sampling import BatchSampling, apply_penalties, sample
from .sequence import RequestState, Sequence

if TYPE_CHECKING:
    from .engine import EngineConfig

Events = list[tuple[RequestState, SequenceOutput]]


class Scheduler:
    def __init__(
        self,
        family: Family,
        config: EngineConfig,
        deliver: Callable[[Events], None],
        dequeued: Callable[[int], None],
        waiting_count: Callable[[], int],
        observe: Callable[[StepStats], None],
    ):
        self.family = family
        self.config = config
        self.device = family.device
        self.vocab_size = family.vocab_size
        self._deliver = deliver  # events -> the callers' loops
        self._dequeued = dequeued  # the engine's count of queued requests
        self._waiting_count = waiting_count
        self._observe = observe  # the engine's on_step
        self._shared_gen = torch.Generator(device=self.device).manual_seed(config.seed)
        self.waiting: deque[RequestState] = deque()
        self._chunking: RequestState | None = None  # a long prompt being prefilled in chunks
        self._rows: list[Sequence] = []
        self.batches = {name: ModelBatch(m) for name, m in family.models.items()}
        self._last_tokens = torch.zeros(0, dtype=torch.long, device=self.device)
        self._dirty = True  # batch membership changed: per-row tensors need a rebuild
        self.num_running = 0  # requests with rows in the batch

    def has_work(self) -> bool:
        return bool(self._rows or self.waiting or self._chunking)

    def cancel(self, rids: set[str]) -> None:
        """Abort these requests wherever they are: waiting, being chunked, or running."""
        events: Events = []
        for state in [s for s in self.waiting if s.rid in rids]:
            self.waiting.remove(state)
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

    def abort_all(self, message: str, reason: str = "abort") -> None:
        """Finish everything with `reason` (shutdown, or a step that raised)."""
        events = []
        for state in list(self.waiting) + ([self._chunking] if self._chunking else []):
            events += self._finish_unstarted(state, reason, message)
        self._dequeued(len(self.waiting))
        self.waiting.clear()
        self._chunking = None
        for seq in self._rows:
            events.append((seq.request, self._final(seq, reason, message)))
        self._keep_rows([])
        self._deliver(events)

    @torch.inference_mode()
    def step(self) -> None:
        t_start = time.perf_counter()
        stats = StepStats(batch_size=0, num_running=0, num_waiting=0)
        n_run = len(self._rows)
        parts = self._decode_parts(stats) if n_run else []
        admitted = self._admit(stats)
        new_rows, prompt_events, joins = self._prefill(admitted, n_run, parts, stats)
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
            self._merge(new_rows, joins, on_device)
        self._deliver(events)
        self._report_finished(events, stats)
        stats.num_running = self.num_running
        stats.num_waiting = self._waiting_count()
        stats.step_seconds = time.perf_counter() - t_start
        for name, batch in self.batches.items():
            stats.kv_cache_tokens[name] = batch.num_tokens()
            stats.kv_cache_bytes[name] = batch.nbytes()
        self._observe(stats)

    def _decode_parts(
        self, stats: StepStats
    ) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Forward every running row's last token through each model it uses."""
        if self._dirty:
            self._rebuild(self._rows)
        parts = []
        for name, (idx, coef) in self._row_index.items():
            t0 = time.perf_counter()
            logits = self.batches[name].forward(
                self._last_tokens.index_select(0, idx).unsqueeze(-1)
            )
            lp = log_probs(logits[:, -1].to(self.device), self.vocab_size)
            parts.append((name, idx, coef, lp))
            stats.forward_seconds[name] = time.perf_counter() - t0
        return parts

    def _admit(self, stats: StepStats) -> list[RequestState]:
        """Requests whose prefill completes this step, within the prefill token budget."""
        budget = self.config.max_prefill_tokens
        if self._chunking is not None:
            state = self._chunking
            if self._advance_chunk(state, stats):
                self._chunking = None
                return [state]
            return []
        admitted: list[RequestState] = []
        used = 0
        rows = len(self._rows)
        while self.waiting:
            state = self.waiting[0]
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

    def _pop_waiting(self) -> RequestState:
        self._dequeued(1)
        return self.waiting.popleft()

    def _advance_chunk(self, state: RequestState, stats: StepStats) -> bool:
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
        admitted: list[RequestState],
        n_run: int,
        parts: list,
        stats: StepStats,
    ) -> tuple[list[Sequence], Events, dict[str, tuple[ModelBatch, list[int]]]]:
        """Prefill admitted requests (one forward per model), add their first-token log-probs
        to `parts` at rows after the running ones, and return their new sequences, their
        events (echo-only requests finish here) and, per model, the prefilled batch with the
        row each new sequence takes from it (siblings share one prefilled row)."""
        if not admitted:
            return [], [], {}
        batches: dict[str, ModelBatch] = {}
        last: dict[str, torch.Tensor] = {}  # model -> [its users, V] last-position logits
        full: dict[tuple[str, int], torch.Tensor] = {}  # (model, request) -> [T, V] for echo
        if admitted[0].chunks:  # a chunk-prefilled request is admitted alone (see _admit)
            batches = dict(admitted[0].chunks)
            last = {name: admitted[0].last_logits[name] for name in batches}
        else:
            for name in self.family.models:
                users = [s for s in admitted if name in s.models]
                if not users:
                    continue
                keep_all = any(s.req.params.prompt_logprobs is not None for s in users)
                batch = ModelBatch(self.family.models[name])
                t0 = time.perf_counter()
                logits = batch.forward(
                    [s.req.prompt_ids[name] for s in users], logits_to_keep=0 if keep_all else 1
                )
                stats.forward_seconds[name] = stats.forward_seconds.get(name, 0.0) + (
                    time.perf_counter() - t0
                )
                for j, s in enumerate(users):
                    if s.req.params.prompt_logprobs is not None:
                        full[(name, id(s))] = logits[j, -len(s.req.prompt_ids[name]) :]
                last[name], batches[name] = logits[:, -1], batch
            stats.prompt_tokens += sum(s.cost for s in admitted)

        new_rows: list[Sequence] = []
        events: Events = []
        for s in admitted:
            plp = (
                self._prompt_logprobs(s, full) if s.req.params.prompt_logprobs is not None else None
            )
            if s.req.params.max_tokens == 0:
                events += self._finish_unstarted(s, "length", prompt_logprobs=plp)
                continue
            s.prompt_lp = plp
            new_rows += [self._new_seq(s, i) for i in range(s.req.params.n)]
        joins: dict[str, tuple[ModelBatch, list[int]]] = {}
        for name, logits in last.items():
            row = {id(s): j for j, s in enumerate(s for s in admitted if name in s.models)}
            src = [row[id(q.request)] for q in new_rows if name in q.request.models]
            dst = [n_run + k for k, q in enumerate(new_rows) if name in q.request.models]
            joins[name] = (batches[name], src)
            if not dst:
                continue
            coef = [new_rows[d - n_run].request.req.composition.coeffs[name] for d in dst]
            lp = log_probs(logits.to(self.device), self.vocab_size)
            parts.append((
                name,
                torch.tensor(dst, device=self.device),
                torch.tensor(coef, device=self.device),
                lp.index_select(0, torch.tensor(src, device=self.device)),
            ))  # fmt: skip
        return new_rows, events, joins

    def _new_seq(self, state: RequestState, index: int) -> Sequence:
        p = state.req.params
        gen = None
        if p.seed is not None:
            # Siblings of a seeded request get distinct but reproducible streams.
            gen = torch.Generator(device=self.device).manual_seed(
                (p.seed * 1_000_003 + index) % (2**63)
            )
        detok = IncrementalDetokenizer(self.family.tokenizer, p.stop, p.skip_special_tokens)
        return Sequence(state, index, p, detok, gen)

    def _prompt_logprobs(
        self, state: RequestState, full: dict[tuple[str, int], torch.Tensor]
    ) -> list[TokenLogprob | None]:
        """Log-prob of every prompt token under the composed distribution (echo scoring)."""
        coeffs = state.req.composition.coeffs
        t = len(state.req.prompt_ids[state.models[0]])
        rows = torch.arange(t, device=self.device)
        parts = []
        for name in state.models:
            lp = log_probs(full[(name, id(state))].to(self.device), self.vocab_size)
            parts.append((rows, torch.full((t,), coeffs[name], device=self.device), lp))
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

    def _rebuild(self, rows: list[Sequence]) -> None:
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
        self._filters = BatchFilters.build([s.request.req.composition for s in rows], dev)
        self._dirty = False

    def _sample(
        self, rows: list[Sequence], composed: torch.Tensor, parts: list
    ) -> tuple[list[int], list[float] | None, list[list[tuple[int, float]]] | None, torch.Tensor]:
        bs = self._sampling
        scores = composed
        if self._filters is not None:
            mask = self._filters.mask(len(rows), self.vocab_size, parts)
            scores = scores.masked_fill(mask, -torch.inf)
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
            prompts = [rows[i].first_prompt for i in bs.penalty_rows]
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

    def _postprocess(
        self,
        rows: list[Sequence],
        tokens: list[int],
        chosen: list[float] | None,
        tops: list[list[tuple[int, float]]] | None,
    ) -> list[tuple[RequestState, SequenceOutput]]:
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

    def _merge(
        self,
        new_rows: list[Sequence],
        joins: dict[str, tuple[ModelBatch, list[int]]],
        tokens: torch.Tensor,
    ) -> None:
        """Add the new rows to every model's batch, then drop finished rows everywhere.

        `tokens` (on the device) are the next decode step's inputs: no host round trip.
        """
        if new_rows:
            for name, (batch, src) in joins.items():
                batch.select(src)  # one row per sibling
                self.batches[name].extend(batch)
            # `_rebuild` already ran for exactly these rows this step: the tensors stay valid.
            self._rows = self._rows + new_rows
        self._last_tokens = tokens.clamp_min(0)
        keep = [i for i, s in enumerate(self._rows) if not s.finished]
        if len(keep) != len(self._rows):
            self._keep_rows(keep)
        self.num_running = len({id(s.request) for s in self._rows})

    def _keep_rows(self, keep: list[int]) -> None:
        """Drop every row not in `keep` from the batch and from each model's cache."""
        for name, batch in self.batches.items():
            members = [i for i, s in enumerate(self._rows) if name in s.request.models]
            if not members:
                continue
            position = {row: j for j, row in enumerate(members)}
            batch.select([position[i] for i in keep if i in position])
        self._rows = [self._rows[i] for i in keep]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._last_tokens = self._last_tokens.index_select(0, index)
        self.num_running = len({id(s.request) for s in self._rows})
        self._dirty = True

    # ------------------------------------------------------------------------ events

    def _final(self, seq: Sequence, reason: str, error: str | None = None) -> SequenceOutput:
        seq.finished = True
        return SequenceOutput(
            request_id=seq.request.rid,
            index=seq.index,
            text=seq.detok.flush() if reason != "error" else "",
            finish_reason=reason,
            error=error,
        )

    def _finish_unstarted(
        self,
        state: RequestState,
        reason: str,
        error: str | None = None,
        prompt_logprobs: list[TokenLogprob | None] | None = None,
    ) -> list[tuple[RequestState, SequenceOutput]]:
        return [
            (
                state,
                SequenceOutput(
                    request_id=state.rid,
                    index=i,
                    finish_reason=reason,
                    error=error,
                    prompt_logprobs=prompt_logprobs if i == 0 else None,
                ),
            )
            for i in range(state.req.params.n)
        ]

    def _report_finished(
        self, events: list[tuple[RequestState, SequenceOutput]], stats: StepStats | None = None
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
        elif finished:
            self._observe(StepStats(0, self.num_running, self._waiting_count(), finished=finished))
