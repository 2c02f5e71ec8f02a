"""The FastAPI app: OpenAI-compatible routes on top of the EFT engine (DESIGN §4).

`create_app(engine, family, settings)` builds the app around an engine that the caller created
(and, for `eft-serve`, started); the app's lifespan warms it up (then `/ready` turns 200) and shuts
it down. Request bodies are parsed by hand rather than by FastAPI so that every client error,
malformed JSON included, is a 400 with an OpenAI error body (FastAPI would answer 422).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError as FastAPIValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from decoding.request import (
    Composition,
    GenerationRequest,
    SamplingParams,
    SequenceOutput,
    TokenLogprob,
)
from server import logprobs as LP
from server import protocol as P
from server.errors import ApiError, bad_request, from_validation_error
from server.knobs import build_composition, model_ids, resolve_model
from server.metrics import ServerMetrics
from server.streaming import ClientGone, Generation, SSEResponse, engine_error, race_disconnect
from server.tokens import TokenText

log = logging.getLogger("eft_serve")
M = TypeVar("M", bound=BaseModel)


@dataclass
class ServerSettings:
    api_key: str | None = None
    allow_negative_weights: bool = False
    max_body_bytes: int = 4 * 1024 * 1024  # generous for 64 prompts, small enough to refuse abuse
    retry_after_s: int = 1
    manage_engine: bool = True  # lifespan warms the engine up and shuts it down
    cors_origins: list[str] = field(default_factory=list)  # browsers' origins; [] = no CORS
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------- auth (ASGI)


def _protected(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1" or path in ("/tokenize", "/detokenize")


class BearerAuth:
    """`Authorization: Bearer KEY` on /v1/*, /tokenize, /detokenize (pure ASGI, no body reads).

    Both sides are hashed first so `compare_digest` compares equal-length values: the time it
    takes says nothing about the key's length or prefix.
    """

    def __init__(self, app: ASGIApp, api_key: str, on_fail: Callable[[], None]):
        self.app = app
        self.digest = hashlib.sha256(api_key.encode()).digest()
        self.on_fail = on_fail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and _protected(scope["path"]):
            token = b""
            for k, v in scope.get("headers", ()):
                if k == b"authorization":
                    scheme, _, token = v.partition(b" ")
                    if scheme.lower() != b"bearer":
                        token = b""
                    break
            if not hmac.compare_digest(hashlib.sha256(token.strip()).digest(), self.digest):
                self.on_fail()
                err = ApiError(401, "Invalid or missing API key (send Authorization: Bearer "
                               "KEY).", code="invalid_api_key", reason="unauthorized",
                               headers={"WWW-Authenticate": "Bearer"})
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ------------------------------------------------------------------------------- helpers


async def read_json(request: Request, limit: int) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"Request body larger than {limit} bytes.", reason="too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"Request body larger than {limit} bytes.", reason="too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"Malformed JSON body: {exc}", code="invalid_json") from exc


def parse(model: type[M], obj: Any) -> M:
    if not isinstance(obj, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc


def _sse(obj: BaseModel | dict[str, Any]) -> str:
    data = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


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
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    started: bool = False


# ------------------------------------------------------------------------------- the app


def create_app(engine: Any, family: Any, settings: ServerSettings | None = None,
               metrics: ServerMetrics | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    if metrics is None:
        metrics = ServerMetrics.for_family(family)
        if getattr(engine, "on_step", "absent") is None:  # an engine built without observer
            engine.on_step = metrics.on_step
    metrics.bind_engine(lambda: engine.num_running, lambda: engine.num_waiting,
                        lambda: bool(getattr(engine, "ready", False)))
    tok = family.tokenizer
    ttext = TokenText(tok)
    vocab = int(family.vocab_size)
    ctx = int(family.context_limit)
    state: dict[str, Any] = {"shutting_down": False, "warmup_error": None}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        warm: asyncio.Task[None] | None = None
        if settings.manage_engine and not getattr(engine, "ready", False):

            async def _warm() -> None:
                try:
                    await engine.warmup()
                    log.info("engine warmed up: ready")
                except Exception as exc:  # /ready stays 503 and says why
                    state["warmup_error"] = f"{type(exc).__name__}: {exc}"
                    log.exception("warmup failed")

            warm = asyncio.create_task(_warm())
        yield
        state["shutting_down"] = True
        if warm is not None:
            warm.cancel()
        if settings.manage_engine:
            await engine.shutdown()

    app = FastAPI(title="eft-serve", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    app.state.family = family
    app.state.metrics = metrics
    app.state.settings = settings

    def begin_drain() -> None:
        # Called from the SIGTERM handler: /ready turns 503 at once (load balancers stop
        # routing here) and new requests on kept-alive connections get 503 while the
        # in-flight ones finish.
        state["shutting_down"] = True

    app.state.begin_drain = begin_drain
    if settings.api_key:
        app.add_middleware(BearerAuth, api_key=settings.api_key,
                           on_fail=lambda: metrics.failure("unauthorized"))
    if settings.cors_origins:
        # Added last = outermost: a browser's preflight OPTIONS is answered before auth.
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(StarletteHTTPException)
    async def _http_exc(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), type=kind, reason="validation",
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(FastAPIValidationError)
    async def _val_exc(request: Request, exc: FastAPIValidationError) -> JSONResponse:
        metrics.failure("validation")
        return bad_request(str(exc.errors()[:1])).response()

    async def handle(request: Request, work: Callable[[Any, float], Awaitable[Response]]
                     ) -> Response:
        """Read the JSON body, then run `work(body, arrival)` racing the client's disconnect.

        Errors become OpenAI bodies plus a failure metric. The body is read *before* the race:
        the disconnect watcher reads ASGI messages too and must not swallow body chunks.
        """
        arrival = time.monotonic()  # TTFT and e2e count from here, tokenization included
        try:
            if state["shutting_down"]:
                raise ApiError(503, "The server is shutting down.", type="service_unavailable",
                               reason="unavailable")
            body = await read_json(request, settings.max_body_bytes)
            return await race_disconnect(request, work(body, arrival))
        except ApiError as exc:
            metrics.failure(exc.reason)
            return exc.response()
        except ClientGone:
            metrics.failure("aborted")
            return Response(status_code=499)
        except Exception as exc:  # a bug here must still answer in the OpenAI shape
            log.exception("unhandled error")
            err = engine_error(exc)
            metrics.failure(err.reason)
            return err.response()

    # ---------------------------------------------------------------- request -> engine

    def sampling(req: P.CompletionRequest | P.ChatCompletionRequest, max_tokens: int,
                 logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
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
        )

    def check_context(prompt_lens: dict[str, int], max_tokens: int | None,
                      comp: Composition) -> int:
        """Resolve max_tokens (None -> what the context leaves) and apply vLLM's length check."""
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

    async def off_loop(fn: Callable[..., Any], *args: Any, size: int, **kw: Any) -> Any:
        # Tokenizing a few MB of text takes seconds; that must not stall every other request
        # (and /health) on the event loop. Small inputs stay inline: a thread hop costs more.
        if size > 8192:
            return await asyncio.to_thread(fn, *args, **kw)
        return fn(*args, **kw)

    async def completion_prompts(req: P.CompletionRequest) -> list[list[int]]:
        p = req.prompt
        special = req.add_special_tokens
        if isinstance(p, str):
            prompts = [await off_loop(tok.encode, p, size=len(p), add_special_tokens=special)]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]  # type: ignore[arg-type]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [await off_loop(tok.encode, s, size=len(s), add_special_tokens=special)
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

    async def chat_prompt(messages: list[P.ChatMessage]) -> dict[str, list[int]]:
        try:
            msgs = [{"role": m.role, "content": m.text()} for m in messages]
        except ValueError as exc:
            raise bad_request(f"messages: {exc}", param="messages") from exc
        try:
            return await off_loop(family.render_chat, msgs,
                                  size=sum(len(m["content"]) for m in msgs))
        except Exception as exc:  # a template that raises on this conversation is a 400
            raise bad_request(f"messages: the chat template failed: {exc}",
                              param="messages") from exc

    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    # ---------------------------------------------------------------- running

    async def run_engine(gen: Generation, timings: list[_Timing], n: int) -> dict[int, _Choice]:
        """Drive a started Generation to the end, accumulating choices (index = prompt*n + i)."""
        choices: dict[int, _Choice] = {}
        async for pi, out in gen.events():
            idx = pi * n + out.index
            ch = choices.setdefault(idx, _Choice())
            account(ch, timings[pi], out)
        return choices

    def account(ch: _Choice, timing: _Timing, out: SequenceOutput) -> None:
        ch.text += out.text
        ch.token_ids += out.token_ids
        if out.logprobs:
            ch.logprobs += out.logprobs
        if out.prompt_logprobs is not None:
            ch.prompt_logprobs = out.prompt_logprobs
        timing.tokens(out.index, len(out.token_ids))
        if out.finish_reason is not None:
            ch.finish_reason = out.finish_reason
            ch.stop_reason = out.stop_reason
            ch.error = out.error
            metrics.finished(out.finish_reason)

    def raise_if_failed(choices: dict[int, _Choice]) -> None:
        for ch in choices.values():
            if ch.finish_reason == "error":
                raise ApiError(500, f"Generation failed: {ch.error or 'engine error'}",
                               type="server_error", reason="error")

    def finish_metrics(timings: list[_Timing], gen_tokens: int) -> None:
        for t in timings:
            t.done()
        metrics.request_generation_tokens.observe(gen_tokens)

    def start_requests(rid: str, prompts: list[dict[str, list[int]]], comp: Composition,
                       params: SamplingParams, t0: float) -> tuple[Generation, list[_Timing]]:
        reqs = [GenerationRequest(request_id=rid if len(prompts) == 1 else f"{rid}-{i}",
                                  prompt_ids=p, composition=comp, params=params)
                for i, p in enumerate(prompts)]
        return Generation(engine, reqs), [_Timing(metrics, t0) for _ in reqs]

    # ---------------------------------------------------------------- completions

    async def completions(body: Any, arrival: float) -> Response:
        req = parse(P.CompletionRequest, body)
        comp = build_composition(family, req.model, req.eft, settings.allow_negative_weights)
        prompts = await completion_prompts(req)
        # One SamplingParams serves every prompt: with max_tokens unset, the shortest budget.
        max_tokens = min(check_context({m: len(ids) for m in family.models}, req.max_tokens, comp)
                         for ids in prompts)
        scoring = req.echo and req.logprobs is not None
        params = sampling(req, max_tokens, req.logprobs,
                          req.logprobs if scoring else req.prompt_logprobs)
        rid = new_id("cmpl")
        per_model = [{m: ids for m in family.models} for ids in prompts]
        prompt_tokens = sum(len(p) for p in prompts)
        gen, timings = start_requests(rid, per_model, comp, params, arrival)
        gen.start()
        metrics.knobs_used(comp.coeffs)
        for p in prompts:
            metrics.request_prompt_tokens.observe(len(p))
        knobs = dict(comp.knobs) if comp.knobs else None
        echo_text = [tok.decode(p) for p in prompts] if req.echo else None
        if req.stream:
            return SSEResponse(stream_completion(req, rid, gen, timings, prompts, echo_text,
                                                 knobs, prompt_tokens), on_close=gen.close)
        try:
            choices = await run_engine(gen, timings, req.n)
        finally:
            gen.close()
        raise_if_failed(choices)
        out_choices = []
        gen_tokens = 0
        for idx in sorted(choices):
            ch = choices[idx]
            pi = idx // req.n
            gen_tokens += len(ch.token_ids)
            text, lp = ch.text, None
            # The engine sends prompt log-probs with sibling 0 only; they hold for all n.
            first = choices.get(pi * req.n, ch)
            plp = ch.prompt_logprobs or first.prompt_logprobs
            if req.logprobs is not None:
                lp, _ = LP.completion_logprobs(ttext, ch.logprobs,
                                               prompt_ids=prompts[pi] if scoring else None,
                                               prompt=plp)
            if echo_text is not None:
                text = echo_text[pi] + text
            choice = P.CompletionChoice(index=idx, text=text, logprobs=lp,
                                        finish_reason=ch.finish_reason, stop_reason=ch.stop_reason)
            if req.prompt_logprobs is not None:
                choice.prompt_logprobs = LP.vllm_prompt_logprobs(ttext, plp)
            out_choices.append(choice)
        finish_metrics(timings, gen_tokens)
        usage = P.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=gen_tokens,
                            total_tokens=prompt_tokens + gen_tokens)
        resp = P.CompletionResponse(id=rid, model=req.model, choices=out_choices, usage=usage,
                                    eft=knobs)
        data = resp.model_dump(mode="json")
        if req.prompt_logprobs is None:  # vLLM's field only when asked for
            for c in data["choices"]:
                del c["prompt_logprobs"]
        return JSONResponse(data)

    async def stream_completion(req: P.CompletionRequest, rid: str, gen: Generation,
                                timings: list[_Timing], prompts: list[list[int]],
                                echo_text: list[str] | None, knobs: dict[str, float] | None,
                                prompt_tokens: int) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        scoring = req.echo and req.logprobs is not None
        created = int(time.time())
        states: dict[int, _Choice] = {}
        offsets: dict[int, int] = {}
        prompt_lp: dict[int, list[TokenLogprob | None]] = {}
        gen_tokens = 0
        ended = False  # False at `finally` means the client left mid-stream
        try:
            async for pi, out in gen.events():
                idx = pi * req.n + out.index
                ch = states.setdefault(idx, _Choice())
                account(ch, timings[pi], out)
                gen_tokens += len(out.token_ids)
                if out.prompt_logprobs is not None:
                    prompt_lp[pi] = out.prompt_logprobs
                if out.finish_reason == "error":
                    err = ApiError(500, f"Generation failed: {out.error or 'engine error'}",
                                   type="server_error", reason="error")
                    metrics.failure("error")
                    yield _sse(err.body())
                    break
                text = out.text
                lp = None
                if req.logprobs is not None:
                    echo_ids = prompts[pi] if scoring and not ch.started else None
                    lp, offsets[idx] = LP.completion_logprobs(
                        ttext, out.logprobs or [], offsets.get(idx, 0), prompt_ids=echo_ids,
                        prompt=prompt_lp.get(pi))
                if not ch.started and echo_text is not None:
                    text = echo_text[pi] + text
                ch.started = True
                if not text and out.finish_reason is None and not (lp and lp.tokens):
                    continue
                chunk = P.CompletionStreamResponse(
                    id=rid, created=created, model=req.model, eft=knobs,
                    choices=[P.CompletionChoice(index=idx, text=text, logprobs=lp,
                                                finish_reason=out.finish_reason,
                                                stop_reason=out.stop_reason)])
                yield _stream_chunk(chunk, include_usage)
            else:
                finish_metrics(timings, gen_tokens)
                if include_usage:
                    usage = P.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=gen_tokens,
                                        total_tokens=prompt_tokens + gen_tokens)
                    yield _sse(P.CompletionStreamResponse(id=rid, created=created, model=req.model,
                                                          choices=[], usage=usage, eft=knobs))
            ended = True
            yield "data: [DONE]\n\n"
        except ApiError as exc:
            ended = True
            metrics.failure(exc.reason)
            yield _sse(exc.body())
            yield "data: [DONE]\n\n"
        finally:
            if not ended:
                metrics.failure("aborted")
            gen.close()

    # ---------------------------------------------------------------- chat

    async def chat(body: Any, arrival: float) -> Response:
        req = parse(P.ChatCompletionRequest, body)
        comp = build_composition(family, req.model, req.eft, settings.allow_negative_weights)
        rendered = await chat_prompt(req.messages)
        lens = {m: len(ids) for m, ids in rendered.items()}
        max_tokens = check_context(lens, req.max_tokens_asked, comp)
        k = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling(req, max_tokens, k, None)
        rid = new_id("chatcmpl")
        used = [m for m in comp.coeffs if m in lens] or list(lens)
        prompt_tokens = max(lens[m] for m in used)
        gen, timings = start_requests(rid, [rendered], comp, params, arrival)
        gen.start()
        metrics.knobs_used(comp.coeffs)
        metrics.request_prompt_tokens.observe(prompt_tokens)
        knobs = dict(comp.knobs) if comp.knobs else None
        if req.stream:
            return SSEResponse(stream_chat(req, rid, gen, timings, knobs, prompt_tokens, k),
                               on_close=gen.close)
        try:
            choices = await run_engine(gen, timings, req.n)
        finally:
            gen.close()
        raise_if_failed(choices)
        out_choices = []
        gen_tokens = 0
        for idx in sorted(choices):
            ch = choices[idx]
            gen_tokens += len(ch.token_ids)
            lp = LP.chat_logprobs(ttext, ch.logprobs, k) if k is not None else None
            msg = P.ChatResponseMessage(content=ch.text)
            out_choices.append(P.ChatChoice(index=idx, message=msg, logprobs=lp,
                                            finish_reason=ch.finish_reason,
                                            stop_reason=ch.stop_reason))
        finish_metrics(timings, gen_tokens)
        usage = P.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=gen_tokens,
                            total_tokens=prompt_tokens + gen_tokens)
        resp = P.ChatCompletionResponse(id=rid, model=req.model, choices=out_choices, usage=usage,
                                        eft=knobs)
        return JSONResponse(resp.model_dump(mode="json"))

    async def stream_chat(req: P.ChatCompletionRequest, rid: str, gen: Generation,
                          timings: list[_Timing], knobs: dict[str, float] | None,
                          prompt_tokens: int, k: int | None) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        created = int(time.time())
        states: dict[int, _Choice] = {}
        gen_tokens = 0
        ended = False

        def chunk(choice: P.ChatStreamChoice) -> str:
            c = P.ChatCompletionStreamResponse(id=rid, created=created, model=req.model,
                                               choices=[choice], eft=knobs)
            return _stream_chunk(c, include_usage)

        try:
            # OpenAI sends the role first, in a chunk of its own, once per choice.
            for i in range(req.n):
                yield chunk(P.ChatStreamChoice(index=i, delta=P.DeltaMessage(role="assistant",
                                                                             content="")))
            async for _, out in gen.events():
                idx = out.index
                ch = states.setdefault(idx, _Choice())
                account(ch, timings[0], out)
                gen_tokens += len(out.token_ids)
                if out.finish_reason == "error":
                    err = ApiError(500, f"Generation failed: {out.error or 'engine error'}",
                                   type="server_error", reason="error")
                    metrics.failure("error")
                    yield _sse(err.body())
                    break
                lp = None
                if k is not None and out.logprobs:
                    lp = LP.chat_logprobs(ttext, out.logprobs, k)
                if not out.text and out.finish_reason is None and lp is None:
                    continue
                delta = P.DeltaMessage(content=out.text) if (out.text or lp) else P.DeltaMessage()
                yield chunk(P.ChatStreamChoice(index=idx, delta=delta, logprobs=lp,
                                               finish_reason=out.finish_reason,
                                               stop_reason=out.stop_reason))
            else:
                finish_metrics(timings, gen_tokens)
                if include_usage:
                    usage = P.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=gen_tokens,
                                        total_tokens=prompt_tokens + gen_tokens)
                    yield _sse(P.ChatCompletionStreamResponse(id=rid, created=created,
                                                              model=req.model, choices=[],
                                                              usage=usage, eft=knobs))
            ended = True
            yield "data: [DONE]\n\n"
        except ApiError as exc:
            ended = True
            metrics.failure(exc.reason)
            yield _sse(exc.body())
            yield "data: [DONE]\n\n"
        finally:
            if not ended:
                metrics.failure("aborted")
            gen.close()

    # ---------------------------------------------------------------- routes

    @app.post("/v1/completions")
    async def _completions(request: Request) -> Response:
        return await handle(request, completions)

    @app.post("/v1/chat/completions")
    async def _chat(request: Request) -> Response:
        return await handle(request, chat)

    def model_cards() -> list[P.ModelCard]:
        cfg = family.config
        ids = model_ids(family)
        cards = [P.ModelCard(id=ids[0], root=cfg.base, max_model_len=ctx, eft={
            "base": cfg.base, "reference": cfg.reference, "experts": list(cfg.experts),
            "defaults": dict(cfg.defaults), "max_weight": float(getattr(cfg, "max_weight", 4.0)),
            "aliases": {a: t for a, t in P.KNOB_ALIASES.items() if t in cfg.experts},
            "filters": ["base_top_p", "plausibility"]})]
        for mid, name in zip(ids[1:], family.models, strict=True):
            cards.append(P.ModelCard(id=mid, root=name, parent=family.name, max_model_len=ctx))
        return cards

    @app.get("/v1/models")
    async def _models() -> Response:
        return JSONResponse(P.ModelList(data=model_cards()).model_dump(mode="json"))

    @app.get("/v1/models/{model_id:path}")
    async def _model(model_id: str) -> Response:
        for card in model_cards():
            if card.id == model_id:
                return JSONResponse(card.model_dump(mode="json"))
        metrics.failure("not_found")
        return ApiError(404, f"The model `{model_id}` does not exist.", param="model",
                        code="model_not_found", reason="not_found").response()

    async def tokenize(body: Any, arrival: float) -> Response:
        req = parse(P.TokenizeRequest, body)
        model = resolve_model(family, req.model) if req.model else None
        if req.prompt is not None:
            ids = await off_loop(tok.encode, req.prompt, size=len(req.prompt),
                                 add_special_tokens=req.add_special_tokens)
        else:
            rendered = await chat_prompt(req.messages or [])
            # The family id: the longest rendering, as usage.prompt_tokens counts it.
            ids = rendered[model] if model else max(rendered.values(), key=len)
        return JSONResponse(P.TokenizeResponse(tokens=list(ids), count=len(ids),
                                               max_model_len=ctx).model_dump())

    async def detokenize(body: Any, arrival: float) -> Response:
        req = parse(P.DetokenizeRequest, body)
        if req.model:
            resolve_model(family, req.model)
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"tokens: token id {bad[0]} is outside the vocabulary "
                              f"(0..{vocab - 1})", param="tokens")
        return JSONResponse(P.DetokenizeResponse(prompt=tok.decode(req.tokens)).model_dump())

    @app.post("/tokenize")
    async def _tokenize(request: Request) -> Response:
        return await handle(request, tokenize)

    @app.post("/detokenize")
    async def _detokenize(request: Request) -> Response:
        return await handle(request, detokenize)

    @app.get("/health")
    async def _health() -> Response:
        # Liveness: cheap, no generation. 503 only when the step loop is gone for good.
        dead = _engine_dead(engine)
        if dead:
            return JSONResponse({"status": "dead", "error": dead}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def _ready() -> Response:
        if state["shutting_down"]:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if getattr(engine, "ready", False):
            return JSONResponse({"status": "ready", "models": list(family.models)})
        body: dict[str, Any] = {"status": "warming up"}
        if state["warmup_error"]:
            body = {"status": "warmup failed", "error": state["warmup_error"]}
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def _metrics() -> Response:
        data, ctype = metrics.render()
        return PlainTextResponse(data, media_type=ctype)

    return app


def _engine_dead(engine: Any) -> str | None:
    """Why the step loop is gone, or None while it serves."""
    return engine.dead


def _stream_chunk(chunk: BaseModel, include_usage: bool) -> str:
    # With include_usage every chunk carries `"usage": null` and a last chunk the totals,
    # exactly as OpenAI does; without it the field is left out.
    data = chunk.model_dump(mode="json", exclude=None if include_usage else {"usage"})
    for choice in data["choices"]:
        # OpenAI's deltas name only what they carry: {"role": ...} first, then {"content": ...}.
        if "delta" in choice:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        if choice.get("prompt_logprobs", 0) is None:
            del choice["prompt_logprobs"]
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"

