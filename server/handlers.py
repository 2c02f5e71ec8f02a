"""The work behind each POST route: request body -> engine requests -> OpenAI response.

`Handlers` holds what every request needs (engine, family, tokenizer, metrics); `server.app`
reads the body and runs one of its `completions`, `chat`, `tokenize`, `detokenize` racing the
client's disconnect. Completions and chat differ only in how they build prompts and choices:
running the engine, the usage/latency bookkeeping and the SSE envelope (error chunk, usage
chunk, `[DONE]`, the aborted-request metric) are shared below.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from decoding.request import (
    Composition,
    GenerationRequest,
    RequestValidationError,
    SamplingParams,
    SequenceOutput,
    TokenLogprob,
    TokenTrace,
)
from server import formats
from server import logprobs as LP
from server import protocol as P
from server.errors import ApiError, bad_request, from_validation_error
from server.knobs import build_composition, resolve_model
from server.limits import (
    ResponseShape,
    check_message_count,
    check_response_size,
    check_sequences,
    check_token_lists,
)
from server.metrics import ServerMetrics
from server.streaming import Generation, SSEResponse
from server.tokens import TokenText
from server.trace import TraceFormatter

_DONE = "data: [DONE]\n\n"
GRAMMAR_TIMEOUT_S = 10.0  # a structured-output format must compile within this
# The peer that sent the request being handled (set by server.app): the engine's waiting queue
# takes turns between clients.
client: contextvars.ContextVar[str | None] = contextvars.ContextVar("client", default=None)
M = TypeVar("M", bound=BaseModel)
OFF_LOOP_CHARS = 8192  # texts (and chats) larger than this are tokenized in a worker thread
OFF_LOOP_RESPONSE_BYTES = 1 << 20  # responses estimated larger are built in a worker thread
MESSAGE_CHARS = 32  # what a message costs a template to render, counted as this many characters


def parse(model: type[M], obj: Any) -> M:
    if not isinstance(obj, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _sse(obj: BaseModel | dict[str, Any]) -> str:
    data = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


def _stream_chunk(chunk: BaseModel, include_usage: bool) -> str:
    # With include_usage every chunk carries `"usage": null` and a last chunk the totals,
    # exactly as OpenAI does; without it the field is left out.
    data = chunk.model_dump(mode="json", exclude=None if include_usage else {"usage"})
    for choice in data["choices"]:
        # OpenAI's deltas name only what they carry: {"role": ...} first, then {"content": ...}.
        if "delta" in choice:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        _drop_unasked(choice)
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _json_response(resp: P.CompletionResponse | P.ChatCompletionResponse) -> Response:
    """The response's JSON, serialized a choice at a time: one json.dumps of a response of many
    MB holds the GIL (and so the event loop, even from a worker thread) for its whole length."""
    head = resp.model_dump(mode="json", exclude={"choices"})
    choices = []
    for choice in resp.choices:
        data = choice.model_dump(mode="json")
        _drop_unasked(data)
        choices.append(_dumps(data))
    body = _dumps(head)[:-1] + ',"choices":[' + ",".join(choices) + "]}"
    return Response(body.encode(), media_type="application/json")


def _dumps(obj: Any) -> str:
    # As starlette's JSONResponse writes it.
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _drop_unasked(choice: dict[str, Any]) -> None:
    """Extension fields appear only when asked for (as vLLM's prompt_logprobs)."""
    for key in ("prompt_logprobs", "trace", "prompt_trace"):
        if choice.get(key, 0) is None:
            del choice[key]


def _shutting_down() -> ApiError:
    return ApiError(503, "The server is shutting down and its shutdown timeout has passed; "
                    "retry on another replica.", type="service_unavailable",
                    code="server_shutting_down", reason="unavailable")


def _generation_failed(error: str | None) -> ApiError:
    return ApiError(500, f"Generation failed: {error or 'engine error'}", type="server_error",
                    reason="error")


class _Timing:
    """Per engine request: arrival, first token, last token per sibling -> TTFT/ITL/e2e."""

    def __init__(self, metrics: ServerMetrics, t0: float):
        self.m = metrics
        self.t0 = t0
        self.first: float | None = None
        self.last: dict[int, float] = {}

    def tokens(self, index: int, k: int) -> None:
        if k <= 0:
            return
        now = time.monotonic()
        if self.first is None:
            self.first = now
            self.m.ttft.observe(now - self.t0)
        prev = self.last.get(index)
        if prev is not None:
            gap = (now - prev) / k  # a speculative step can deliver several tokens at once
            for _ in range(k):
                self.m.itl.observe(gap)
        self.last[index] = now

    def done(self) -> None:
        self.m.e2e.observe(time.monotonic() - self.t0)


@dataclass
class _Choice:
    """Accumulated state of one output choice."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    trace: list[TokenTrace] = field(default_factory=list)
    prompt_trace: list[TokenTrace | None] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    started: bool = False
    spec_drafted: int = 0
    spec_accepted: int = 0


@dataclass
class _Run:
    """One HTTP request's started engine requests and what its response echoes."""

    rid: str
    model: str
    n: int
    gen: Generation
    timings: list[_Timing]
    prompt_tokens: int
    knobs: dict[str, float] | None
    trace: TraceFormatter | None  # with "eft": {"trace": true}


StreamResponse = P.CompletionStreamResponse | P.ChatCompletionStreamResponse
# (prompt index, choice index, the choice so far, the new event) -> the chunk's choice, or None
# when the event carries nothing to send.
ChoiceFn = Callable[[int, int, _Choice, SequenceOutput], BaseModel | None]


class Handlers:
    """Completions, chat, tokenize and detokenize for one engine and family."""

    def __init__(self, engine: Any, family: Any, metrics: ServerMetrics,
                 allow_negative_weights: bool = False, sse_ping_s: float = 15.0,
                 max_response_bytes: int = 16 * 1024 * 1024):
        self.engine = engine
        self.sse_ping_s = sse_ping_s
        self.open: set[Generation] = set()  # runs not yet closed: what a shutdown must end
        self.ended = False  # the shutdown deadline has passed
        self.family = family
        self.metrics = metrics
        self.allow_negative_weights = allow_negative_weights
        self.tok = family.tokenizer
        self.ttext = TokenText(self.tok)
        self.vocab = int(family.vocab_size)
        self.ctx = int(family.context_limit)
        # No token covers more characters than the longest vocabulary entry (byte-level and
        # SentencePiece pieces spell at least the characters they stand for), so a text longer
        # than ctx * that many characters cannot fit and is refused without tokenizing it.
        longest_piece = max((len(p) for p in self.tok.get_vocab()), default=1)
        self.max_text_chars = self.ctx * max(longest_piece, 1)
        self._big_text = asyncio.Semaphore(1)  # one large tokenization at a time
        self._compiling = asyncio.Semaphore(1)  # one grammar compile at a time
        self.max_response_bytes = max_response_bytes
        self.max_seqs = int(getattr(engine, "max_seqs_per_request", 1 << 30))

    # ---------------------------------------------------------------- request -> engine

    def sampling(self, req: P.CompletionRequest | P.ChatCompletionRequest, max_tokens: int,
                 logprobs: int | None, prompt_logprobs: int | None,
                 grammar: str | None = None) -> SamplingParams:
        """The engine's sampling parameters (with the `eft.trace` switch and the request's
        compiled format, `grammar`)."""
        vocab = self.vocab
        for t in req.stop_token_ids or []:
            if not 0 <= t < vocab:
                raise bad_request(f"stop_token_ids: {t} is outside the vocabulary (0..{vocab - 1})",
                                  param="stop_token_ids")
        top_k = req.top_k or 0
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if top_k < 0 else top_k,
            min_p=req.min_p or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            n=req.n,
            seed=req.seed,
            stop=list(req.stop or []),
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens,
            trace=bool((req.eft or {}).get("trace")),
            speculative=bool((req.eft or {}).get("speculative", True)),
            grammar=grammar,
        )

    async def grammar(self, req: P.CompletionRequest | P.ChatCompletionRequest) -> str | None:
        """The request's structured-output format as a grammar compiled by the engine (cached
        by its text), or None. A grammar compiles in a thread, one at a time, so a large one
        stalls neither the event loop nor the other requests' compiles beyond one; llguidance
        bounds its own work, and a compile that still outlasts `GRAMMAR_TIMEOUT_S` is a 400."""
        spec = formats.grammar_of(req)
        if spec is None:
            return None
        text, param = spec
        try:
            async with self._compiling:
                await asyncio.wait_for(asyncio.to_thread(self.engine.grammars.compile, text, param),
                                       GRAMMAR_TIMEOUT_S)
        except TimeoutError as exc:
            raise bad_request(f"{param}: the format took longer than {GRAMMAR_TIMEOUT_S:g} s to "
                              "compile; simplify it", param=param) from exc
        except RequestValidationError as exc:
            raise bad_request(exc.message, param=exc.param) from exc
        return text

    def check_context(self, prompt_lens: dict[str, int], max_tokens: int | None,
                      comp: Composition) -> int:
        """Resolve max_tokens (None -> what the context leaves) and apply vLLM's length check."""
        ctx = self.ctx
        used = [m for m in comp.coeffs if m in prompt_lens] or list(prompt_lens)
        longest = max(prompt_lens[m] for m in used)
        if max_tokens is None:
            max_tokens = ctx - longest
            if max_tokens < 1:
                max_tokens = 1  # falls through to the error below
        if longest + max_tokens > ctx:
            raise bad_request(
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{longest + max_tokens} tokens ({longest} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion.",
                param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def check_text_size(self, chars: int, param: str) -> None:
        """Refuse a text that cannot fit the context before spending any work on it."""
        if chars > self.max_text_chars:
            raise bad_request(
                f"This model's maximum context length is {self.ctx} tokens. However, the "
                f"{param} holds {chars} characters, more than {self.ctx} tokens of this "
                f"tokenizer can spell ({self.max_text_chars}). Please reduce its length.",
                param=param, code="context_length_exceeded")

    async def off_loop(self, fn: Callable[..., Any], *args: Any, size: int, **kw: Any) -> Any:
        # Tokenizing a large text takes a while; that must not stall every other request (and
        # /health) on the event loop, and several at once must not take every core from the
        # engine: they run in a thread, one at a time. Small inputs stay inline (a thread hop
        # costs more than they do).
        if size > OFF_LOOP_CHARS:
            async with self._big_text:
                return await asyncio.to_thread(fn, *args, **kw)
        return fn(*args, **kw)

    async def completion_prompts(self, req: P.CompletionRequest) -> list[list[int]]:
        p = req.prompt
        special = req.add_special_tokens
        encode, vocab = self.tok.encode, self.vocab
        for text in [p] if isinstance(p, str) else p:
            if isinstance(text, str):
                self.check_text_size(len(text), "prompt")
        if isinstance(p, str):
            prompts = [await self.off_loop(encode, p, size=len(p), add_special_tokens=special)]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]  # type: ignore[arg-type]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [await self.off_loop(encode, s, size=len(s), add_special_tokens=special)
                       for s in p]
        else:
            prompts = [list(x) for x in p]  # type: ignore[union-attr]
        for ids in prompts:
            if not ids:
                raise bad_request("prompt: empty after tokenization", param="prompt")
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise bad_request(f"prompt: token id {bad[0]} is outside the vocabulary "
                                  f"(0..{vocab - 1})", param="prompt")
        return prompts

    async def chat_prompt(self, messages: list[P.ChatMessage]) -> dict[str, list[int]]:
        try:
            msgs = [{"role": m.role, "content": m.text()} for m in messages]
        except ValueError as exc:
            raise bad_request(f"messages: {exc}", param="messages") from exc
        chars = sum(len(m["content"]) for m in msgs)
        self.check_text_size(chars, "messages")
        try:
            return await self.off_loop(self.family.render_chat, msgs,
                                       size=chars + MESSAGE_CHARS * len(msgs))
        except Exception as exc:  # a template that raises on this conversation is a 400
            raise bad_request(f"messages: the chat template failed: {exc}",
                              param="messages") from exc

    def composition(self, req: P.CompletionRequest | P.ChatCompletionRequest) -> Composition:
        knobs = {k: v for k, v in (req.eft or {}).items() if k not in P.EFT_FLAGS}
        return build_composition(self.family, req.model, knobs, self.allow_negative_weights)

    def start(self, rid: str, req: P.CompletionRequest | P.ChatCompletionRequest,
              prompts: list[dict[str, list[int]]], comp: Composition, params: SamplingParams,
              t0: float, prompt_tokens: int) -> _Run:
        """Submit one engine request per prompt (refusals raise here, before any response)."""
        who = client.get()
        reqs = [GenerationRequest(request_id=rid if len(prompts) == 1 else f"{rid}-{i}",
                                  prompt_ids=p, composition=comp, params=params, client=who)
                for i, p in enumerate(prompts)]
        if self.ended:
            raise _shutting_down()
        gen = Generation(self.engine, reqs)
        timings = [_Timing(self.metrics, t0) for _ in reqs]
        gen.start()
        self.open.add(gen)
        self.metrics.knobs_used(comp.coeffs)
        trace = TraceFormatter(self.family, comp, self.ttext) if params.trace else None
        return _Run(rid=rid, model=req.model, n=req.n, gen=gen, timings=timings,
                    prompt_tokens=prompt_tokens, knobs=dict(comp.knobs) if comp.knobs else None,
                    trace=trace)

    # ---------------------------------------------------------------- engine -> choices

    def account(self, ch: _Choice, timing: _Timing, out: SequenceOutput) -> None:
        ch.text += out.text
        ch.token_ids += out.token_ids
        if out.logprobs:
            ch.logprobs += out.logprobs
        if out.prompt_logprobs is not None:
            ch.prompt_logprobs = out.prompt_logprobs
        if out.trace:
            ch.trace += out.trace
        if out.prompt_trace is not None:
            ch.prompt_trace = out.prompt_trace
        ch.spec_drafted += out.spec_drafted
        ch.spec_accepted += out.spec_accepted
        timing.tokens(out.index, len(out.token_ids))
        if out.finish_reason is not None:
            ch.finish_reason = out.finish_reason
            ch.stop_reason = out.stop_reason
            ch.error = out.error
            self.metrics.finished(out.finish_reason)

    async def collect(self, run: _Run) -> dict[int, _Choice]:
        """Drive the run to its end, accumulating choices (index = prompt * n + sibling)."""
        choices: dict[int, _Choice] = {}
        try:
            async for pi, out in run.gen.events():
                ch = choices.setdefault(pi * run.n + out.index, _Choice())
                self.account(ch, run.timings[pi], out)
        finally:
            self.close(run)
        for ch in choices.values():
            if ch.finish_reason == "error":
                raise _generation_failed(ch.error)
        return choices

    def finish(self, run: _Run, choices: Iterable[_Choice]) -> P.UsageInfo:
        """The run is over: close its latency metrics, count its tokens, return its usage
        (summed over every choice of every prompt)."""
        chs = list(choices)
        for t in run.timings:
            t.done()
        gen_tokens = sum(len(ch.token_ids) for ch in chs)
        self.metrics.request_generation_tokens.observe(gen_tokens)
        drafted = sum(ch.spec_drafted for ch in chs)
        spec = None
        if drafted:
            spec = P.SpeculativeUsage(drafted_tokens=drafted,
                                      accepted_tokens=sum(ch.spec_accepted for ch in chs))
        return P.UsageInfo(prompt_tokens=run.prompt_tokens, completion_tokens=gen_tokens,
                           total_tokens=run.prompt_tokens + gen_tokens, eft_speculative=spec)

    async def stream(self, run: _Run, chunk_cls: type[StreamResponse], include_usage: bool,
                     to_choice: ChoiceFn, first: Iterable[BaseModel] = ()) -> AsyncIterator[str]:
        """The SSE body of a streamed response: a chunk per `first` choice, then one per event
        that `to_choice` turns into a choice; at the end the usage chunk (when asked for) and
        `[DONE]`. A failed sequence or an engine error mid-stream becomes an error chunk, then
        `[DONE]`; a client that leaves before the end counts as `aborted`."""
        created = int(time.time())
        states: dict[int, _Choice] = {}

        def chunk(choices: list[Any], **extra: Any) -> StreamResponse:
            return chunk_cls(id=run.rid, created=created, model=run.model, choices=choices,
                             eft=run.knobs, **extra)

        ended = False  # False at `finally` means the client left mid-stream
        try:
            for choice in first:
                yield _stream_chunk(chunk([choice]), include_usage)
            async for pi, out in run.gen.events():
                idx = pi * run.n + out.index
                ch = states.setdefault(idx, _Choice())
                self.account(ch, run.timings[pi], out)
                if out.finish_reason == "error":
                    self.metrics.failure("error")
                    yield _sse(_generation_failed(out.error).body())
                    break
                choice = to_choice(pi, idx, ch, out)
                if choice is not None:
                    yield _stream_chunk(chunk([choice]), include_usage)
            else:
                usage = self.finish(run, states.values())
                if include_usage:
                    yield _sse(chunk([], usage=usage))
            ended = True
            yield _DONE
        except ApiError as exc:
            ended = True
            self.metrics.failure(exc.reason)
            yield _sse(exc.body())
            yield _DONE
        finally:
            if not ended:
                self.metrics.failure("aborted")
            self.close(run)

    def close(self, run: _Run) -> None:
        run.gen.close()
        self.open.discard(run.gen)

    def end_open_requests(self) -> int:
        """The shutdown deadline: every open run ends now (a stream with an error chunk and
        `[DONE]`, a non-streamed request with a 503); returns how many there were."""
        self.ended = True
        runs = [g for g in self.open if not g.closed]
        for gen in runs:
            gen.abort(_shutting_down())
        return len(runs)

    async def respond(self, size: int, build: Callable[..., Response], *args: Any) -> Response:
        # Building a response of many MB (logprobs, traces) takes seconds of Python: a large
        # one is built in a worker thread, so that /health and running streams go on meanwhile.
        if size > OFF_LOOP_RESPONSE_BYTES:
            return await asyncio.to_thread(build, *args)
        return build(*args)

    # ---------------------------------------------------------------- completions

    async def completions(self, body: Any, arrival: float) -> Response:
        check_token_lists(body, "prompt", self.ctx)
        req = parse(P.CompletionRequest, body)
        p = req.prompt
        count = len(p) if isinstance(p, list) and p and not isinstance(p[0], int) else 1
        check_sequences(count, req.n, self.max_seqs)
        comp = self.composition(req)
        prompts = await self.completion_prompts(req)
        models = self.family.models
        # One SamplingParams serves every prompt: with max_tokens unset, the shortest budget.
        max_tokens = min(self.check_context({m: len(ids) for m in models}, req.max_tokens, comp)
                         for ids in prompts)
        scoring = req.echo and req.logprobs is not None
        params = self.sampling(req, max_tokens, req.logprobs,
                               req.logprobs if scoring else req.prompt_logprobs,
                               await self.grammar(req))
        shape = ResponseShape(n=req.n, max_tokens=max_tokens, stream=req.stream, echo=req.echo,
                              logprobs=req.logprobs, prompt_logprobs=params.prompt_logprobs,
                              trace=params.trace, trace_models=len(comp.coeffs))
        size = check_response_size(shape, [len(ids) for ids in prompts], self.max_response_bytes)
        per_model = [{m: ids for m in models} for ids in prompts]
        run = self.start(new_id("cmpl"), req, per_model, comp, params, arrival,
                         prompt_tokens=sum(len(p) for p in prompts))
        for p in prompts:
            self.metrics.request_prompt_tokens.observe(len(p))
        echo_text = [self.tok.decode(p) for p in prompts] if req.echo else None
        if req.stream:
            return SSEResponse(self.stream_completion(req, run, prompts, echo_text),
                               on_close=lambda: self.close(run), ping_s=self.sse_ping_s)
        choices = await self.collect(run)
        return await self.respond(size, self.completion_response, req, run, prompts, echo_text,
                                  choices)

    def completion_response(self, req: P.CompletionRequest, run: _Run, prompts: list[list[int]],
                            echo_text: list[str] | None, choices: dict[int, _Choice]
                            ) -> Response:
        scoring = req.echo and req.logprobs is not None
        out_choices = []
        for idx in sorted(choices):
            ch = choices[idx]
            pi = idx // req.n
            text, lp = ch.text, None
            # The engine sends prompt log-probs with sibling 0 only; they hold for all n.
            first = choices.get(pi * req.n, ch)
            plp = ch.prompt_logprobs or first.prompt_logprobs
            if req.logprobs is not None:
                lp, _ = LP.completion_logprobs(self.ttext, ch.logprobs,
                                               prompt_ids=prompts[pi] if scoring else None,
                                               prompt=plp)
            if echo_text is not None:
                text = echo_text[pi] + text
            choice = P.CompletionChoice(index=idx, text=text, logprobs=lp,
                                        finish_reason=ch.finish_reason, stop_reason=ch.stop_reason)
            if req.prompt_logprobs is not None:
                choice.prompt_logprobs = LP.vllm_prompt_logprobs(self.ttext, plp)
            if run.trace is not None:
                choice.trace = run.trace.entries(ch.trace)
                choice.prompt_trace = run.trace.entries(ch.prompt_trace or first.prompt_trace)
            out_choices.append(choice)
        usage = self.finish(run, choices.values())
        resp = P.CompletionResponse(id=run.rid, model=req.model, choices=out_choices, usage=usage,
                                    eft=run.knobs)
        return _json_response(resp)

    def stream_completion(self, req: P.CompletionRequest, run: _Run, prompts: list[list[int]],
                          echo_text: list[str] | None) -> AsyncIterator[str]:
        scoring = req.echo and req.logprobs is not None
        offsets: dict[int, int] = {}
        prompt_lp: dict[int, list[TokenLogprob | None]] = {}

        def to_choice(pi: int, idx: int, ch: _Choice, out: SequenceOutput
                      ) -> P.CompletionChoice | None:
            if out.prompt_logprobs is not None:
                prompt_lp[pi] = out.prompt_logprobs
            text = out.text
            lp = None
            if req.logprobs is not None:
                echo_ids = prompts[pi] if scoring and not ch.started else None
                lp, offsets[idx] = LP.completion_logprobs(
                    self.ttext, out.logprobs or [], offsets.get(idx, 0), prompt_ids=echo_ids,
                    prompt=prompt_lp.get(pi))
            if not ch.started and echo_text is not None:
                text = echo_text[pi] + text
            # vLLM sends prompt_logprobs once, in each choice's first chunk.
            plp = None
            if req.prompt_logprobs is not None and not ch.started and pi in prompt_lp:
                plp = LP.vllm_prompt_logprobs(self.ttext, prompt_lp[pi])
            ch.started = True
            trace = run.trace.entries(out.trace) if run.trace is not None and out.trace else None
            ptrace = run.trace.entries(out.prompt_trace) if run.trace is not None else None
            if (not text and out.finish_reason is None and not (lp and lp.tokens) and not trace
                    and plp is None):
                return None
            return P.CompletionChoice(index=idx, text=text, logprobs=lp,
                                      finish_reason=out.finish_reason, stop_reason=out.stop_reason,
                                      prompt_logprobs=plp, trace=trace, prompt_trace=ptrace)

        return self.stream(run, P.CompletionStreamResponse, _include_usage(req), to_choice)

    # ---------------------------------------------------------------- chat

    async def chat(self, body: Any, arrival: float) -> Response:
        check_message_count(body, self.ctx)
        req = parse(P.ChatCompletionRequest, body)
        check_sequences(1, req.n, self.max_seqs)
        comp = self.composition(req)
        rendered = await self.chat_prompt(req.messages)
        lens = {m: len(ids) for m, ids in rendered.items()}
        max_tokens = self.check_context(lens, req.max_tokens_asked, comp)
        k = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling(req, max_tokens, k, None, await self.grammar(req))
        used = [m for m in comp.coeffs if m in lens] or list(lens)
        prompt_tokens = max(lens[m] for m in used)
        shape = ResponseShape(n=req.n, max_tokens=max_tokens, stream=req.stream, logprobs=k,
                              trace=params.trace, trace_models=len(comp.coeffs))
        size = check_response_size(shape, [prompt_tokens], self.max_response_bytes)
        run = self.start(new_id("chatcmpl"), req, [rendered], comp, params, arrival,
                         prompt_tokens=prompt_tokens)
        self.metrics.request_prompt_tokens.observe(prompt_tokens)
        if req.stream:
            return SSEResponse(self.stream_chat(req, run, k), on_close=lambda: self.close(run),
                               ping_s=self.sse_ping_s)
        choices = await self.collect(run)
        return await self.respond(size, self.chat_response, req, run, k, choices)

    def chat_response(self, req: P.ChatCompletionRequest, run: _Run, k: int | None,
                      choices: dict[int, _Choice]) -> Response:
        out_choices = []
        for idx in sorted(choices):
            ch = choices[idx]
            lp = LP.chat_logprobs(self.ttext, ch.logprobs, k) if k is not None else None
            msg = P.ChatResponseMessage(content=ch.text)
            trace = run.trace.entries(ch.trace) if run.trace is not None else None
            out_choices.append(P.ChatChoice(index=idx, message=msg, logprobs=lp,
                                            finish_reason=ch.finish_reason,
                                            stop_reason=ch.stop_reason, trace=trace))
        usage = self.finish(run, choices.values())
        resp = P.ChatCompletionResponse(id=run.rid, model=req.model, choices=out_choices,
                                        usage=usage, eft=run.knobs)
        return _json_response(resp)

    def stream_chat(self, req: P.ChatCompletionRequest, run: _Run, k: int | None
                    ) -> AsyncIterator[str]:
        def to_choice(pi: int, idx: int, ch: _Choice, out: SequenceOutput
                      ) -> P.ChatStreamChoice | None:
            lp = None
            if k is not None and out.logprobs:
                lp = LP.chat_logprobs(self.ttext, out.logprobs, k)
            trace = run.trace.entries(out.trace) if run.trace is not None and out.trace else None
            if not out.text and out.finish_reason is None and lp is None and trace is None:
                return None
            delta = P.DeltaMessage(content=out.text) if (out.text or lp) else P.DeltaMessage()
            return P.ChatStreamChoice(index=idx, delta=delta, logprobs=lp,
                                      finish_reason=out.finish_reason, stop_reason=out.stop_reason,
                                      trace=trace)

        # OpenAI sends the role first, in a chunk of its own, once per choice.
        roles = [P.ChatStreamChoice(index=i, delta=P.DeltaMessage(role="assistant", content=""))
                 for i in range(req.n)]
        return self.stream(run, P.ChatCompletionStreamResponse, _include_usage(req), to_choice,
                           first=roles)

    # ---------------------------------------------------------------- tokenizer routes

    async def tokenize(self, body: Any, arrival: float) -> Response:
        check_message_count(body, self.ctx)
        req = parse(P.TokenizeRequest, body)
        model = resolve_model(self.family, req.model) if req.model else None
        if req.prompt is not None:
            self.check_text_size(len(req.prompt), "prompt")
            ids = await self.off_loop(self.tok.encode, req.prompt, size=len(req.prompt),
                                      add_special_tokens=req.add_special_tokens)
        else:
            rendered = await self.chat_prompt(req.messages or [])
            # The family id: the longest rendering, as usage.prompt_tokens counts it.
            ids = rendered[model] if model else max(rendered.values(), key=len)
        return JSONResponse(P.TokenizeResponse(tokens=list(ids), count=len(ids),
                                               max_model_len=self.ctx).model_dump())

    async def detokenize(self, body: Any, arrival: float) -> Response:
        check_token_lists(body, "tokens", self.ctx)
        req = parse(P.DetokenizeRequest, body)
        if req.model:
            resolve_model(self.family, req.model)
        vocab = self.vocab
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"tokens: token id {bad[0]} is outside the vocabulary "
                              f"(0..{vocab - 1})", param="tokens")
        return JSONResponse(P.DetokenizeResponse(prompt=self.tok.decode(req.tokens)).model_dump())


def _include_usage(req: P.CompletionRequest | P.ChatCompletionRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)
