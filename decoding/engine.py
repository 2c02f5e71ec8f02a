"""The engine: an async API in front of one thread that owns every model's state.

Callers live on an asyncio loop: `submit()` validates a request synchronously (context length,
queue bound), puts it in the inbox and returns an async iterator of `SequenceOutput`, fed
through `loop.call_soon_threadsafe`; leaving the iterator early cancels the request. The
engine thread drains the inbox between steps and runs `Scheduler.step()` while there is work
(`decoding/scheduler.py` holds the step itself).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

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
from .scheduler import Events, Scheduler
from .sequence import RequestState

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_batch_size: int = 32  # sequences decoding together (n siblings count separately)
    max_waiting: int = 256  # requests queued for admission; beyond it submit() refuses
    max_prefill_tokens: int = 512  # prompt tokens prefilled per step; longer prompts are chunked
    seed: int = 0  # of the generator shared by unseeded requests
    idle_wait_s: float = 0.5  # how long the idle loop sleeps between checks for shutdown


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
        self._inbox: deque[tuple[str, object]] = deque()
        self._num_waiting = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._dead: str | None = None
        # Everything below the inbox belongs to the engine thread.
        self.scheduler = Scheduler(
            family, self.config, self._deliver, self._dequeued, lambda: self._num_waiting,
            self._observe,
        )  # fmt: skip

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
            self._inbox.extend(("submit", state) for state in states)
        self._wake.set()
        self.start()
        return [self._stream(state) for state in states]

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
        cost = max(len(req.prompt_ids[m]) for m in models)
        return RequestState(req, asyncio.get_running_loop(), asyncio.Queue(), models, cost)

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            while True:
                self._drain_inbox()
                if self._stopping:
                    self.scheduler.abort_all("the engine is shutting down")
                    return
                if not self.scheduler.has_work():
                    self._wake.wait(self.config.idle_wait_s)
                    self._wake.clear()
                    continue
                try:
                    self.scheduler.step()
                except Exception as exc:  # a bug or OOM fails the batch, not the server
                    log.exception("engine step failed")
                    self.scheduler.abort_all(f"engine step failed: {exc}", reason="error")
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
                self.scheduler.waiting.append(value)  # type: ignore[arg-type]
            else:
                cancelled.add(value)
        if cancelled:
            self.scheduler.cancel(cancelled)

    def _dequeued(self, count: int) -> None:
        with self._lock:
            self._num_waiting -= count

    def _observe(self, stats: StepStats) -> None:
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
