"""Admission and the token budget: who runs in the next step. Bookkeeping only, no tensors.

Each step has one budget of `max_num_batched_tokens` (vLLM's chunked prefill): every running
row decodes one token, and prompts take what is left, first the one being prefilled, then new
requests in arrival order while batch rows are free. While rows decode, prompts get at most
`prefill_share` tokens per decoding row: a step's cost grows with the tokens it processes, so
this keeps a step with a joining prompt within about twice a plain decode step. A prompt longer
than its share is prefilled in chunks over several steps, so decoding rows never wait long for a
newcomer.
A request needing every prompt position's log-probs (echo scoring) is prefilled whole in one
step; it waits for a step with room unless nothing else is prefilling.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .config import EngineConfig
from .sequence import RequestState, Sequence

MIN_PREFILL_CHUNK = 16  # prompt tokens a step may always prefill


@dataclass
class PrefillChunk:
    state: RequestState
    spans: dict[str, tuple[int, int]]  # model -> [start, end) of its prompt in this step
    last: bool  # the prompt is complete for every model after this chunk

    @property
    def tokens(self) -> int:
        return max(end - start for start, end in self.spans.values())


@dataclass
class StepPlan:
    decode: list[Sequence]  # running rows, one token each, in batch order
    prefill: list[PrefillChunk]

    @property
    def empty(self) -> bool:
        return not (self.decode or self.prefill)


class Scheduler:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.waiting: deque[RequestState] = deque()
        self.prefilling: list[RequestState] = []  # admitted, prompt not complete yet
        self.running: list[Sequence] = []

    def has_work(self) -> bool:
        return bool(self.running or self.prefilling or self.waiting)

    @property
    def num_running(self) -> int:
        """Requests with rows decoding or a prompt being prefilled."""
        return len({id(s.request) for s in self.running}) + len(self.prefilling)

    def rows_reserved(self) -> int:
        return len(self.running) + sum(s.params.n for s in self.prefilling)

    def schedule(self) -> tuple[StepPlan, list[RequestState]]:
        """The next step's plan, and the requests it admitted from the waiting queue."""
        cfg = self.config
        decoding = len(self.running)
        left = cfg.max_num_batched_tokens - decoding
        floor = min(MIN_PREFILL_CHUNK, cfg.max_num_batched_tokens)
        if decoding and cfg.prefill_share > 0:
            left = min(left, max(floor, int(cfg.prefill_share * decoding)))
        left = max(left, floor)  # a full batch of decoders cannot starve newcomers
        chunks: list[PrefillChunk] = []
        for state in self.prefilling:
            if left <= 0:
                break
            chunk = self._chunk(state, left)
            chunks.append(chunk)
            left -= chunk.tokens
        admitted: list[RequestState] = []
        rows = self.rows_reserved()
        while self.waiting and left > 0:
            state = self.waiting[0]
            if rows + state.params.n > self.config.max_batch_size:
                break
            whole = state.params.prompt_logprobs is not None
            if whole and state.cost > left and (chunks or admitted):
                break  # echo scoring needs its whole prompt in one step: wait for room
            self.waiting.popleft()
            admitted.append(state)
            self.prefilling.append(state)
            rows += state.params.n
            chunk = self._chunk(state, state.cost if whole else left)
            chunks.append(chunk)
            left -= chunk.tokens
        return StepPlan(list(self.running), chunks), admitted

    @staticmethod
    def _chunk(state: RequestState, size: int) -> PrefillChunk:
        spans = {}
        for m in state.models:
            start = state.cursor.get(m, 0)
            end = min(start + size, len(state.req.prompt_ids[m]))
            if end > start:
                spans[m] = (start, end)
        last = all(
            spans.get(m, (0, state.cursor.get(m, 0)))[1] == len(state.req.prompt_ids[m])
            for m in state.models
        )
        return PrefillChunk(state, spans, last)

    def joined(self, state: RequestState, rows: list[Sequence]) -> None:
        """A prompt is complete: its rows run from the next step on."""
        self.drop_prefilling(state)
        self.running.extend(rows)

    def drop_prefilling(self, state: RequestState) -> None:
        if state in self.prefilling:
            self.prefilling.remove(state)

    def retire(self) -> list[Sequence]:
        """Remove finished rows from the batch; returns them (their slots are to be freed)."""
        done = [s for s in self.running if s.finished]
        if done:
            self.running = [s for s in self.running if not s.finished]
        return done
