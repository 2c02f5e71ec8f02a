"""The FastAPI app: OpenAI-compatible routes on top of the EFT engine (docs/api.md).

`create_app(engine, family, settings)` builds the app around an engine that the caller created
(and, for `eft-serve`, started); the app's lifespan warms it up (then `/ready` turns 200) and shuts
it down. Request bodies are parsed by hand rather than by FastAPI so that every client error,
malformed JSON included, is a 400 with an OpenAI error body (FastAPI would answer 422).

This module is the HTTP plumbing (auth, body limits, error bodies, disconnects, the ops
endpoints); what completions, chat, tokenize and detokenize do is in `server.handlers`.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError as FastAPIValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import openapi
from server import protocol as P
from server.body import check_media_type, parse_json_off_loop, read_body
from server.errors import ApiError, bad_request
from server.handlers import Handlers, client
from server.knobs import single_model_ids
from server.metrics import ServerMetrics
from server.streaming import ClientGone, engine_error, race_disconnect
from server.version import package_version

log = logging.getLogger("eft_serve")


@dataclass
class ServerSettings:
    api_key: str | None = None
    allow_negative_weights: bool = False
    max_body_bytes: int = 4 * 1024 * 1024  # generous for 64 prompts, small enough to refuse abuse
    max_response_bytes: int = 16 * 1024 * 1024  # estimated before any work (server.limits)
    retry_after_s: int = 1
    read_timeout_s: float = 30.0  # a request body must arrive within this (else 408)
    sse_ping_s: float = 15.0  # comment pings on a stream that has sent nothing for this long
    shutdown_timeout_s: float = 30.0  # after a drain starts, open requests end with a 503/error
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


# ------------------------------------------------------------------------------- request ids

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_USABLE_ID = re.compile(rb"^[A-Za-z0-9._:/+=@-]{1,128}$")


class RequestId:
    """Every response carries `X-Request-Id`: the client's when it sent a usable one (short,
    printable), else a new one. The id is also in every log line of this request."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for k, v in scope.get("headers", ()):
            if k == b"x-request-id" and _USABLE_ID.match(v):
                rid = v.decode()
        rid = rid or uuid.uuid4().hex
        token = request_id.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)


class _RequestIdLog(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rid = request_id.get()
        if rid and not getattr(record, "request_id", None):
            record.request_id = rid
            record.msg = f"[{rid}] {record.msg}"
        return True


log.addFilter(_RequestIdLog())


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
    handlers = Handlers(engine, family, metrics, settings.allow_negative_weights,
                        sse_ping_s=settings.sse_ping_s,
                        max_response_bytes=settings.max_response_bytes)
    ctx = handlers.ctx
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
        state["loop"] = asyncio.get_running_loop()
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

    def end_open_requests(why: str | None = None) -> None:
        n = handlers.end_open_requests()
        why = why or f"shutdown timeout ({settings.shutdown_timeout_s:g} s) passed"
        log.warning("%s: ended %d open request(s) with a 503 or a final error chunk", why, n)

    def begin_drain() -> None:
        # Called from the SIGTERM handler: /ready turns 503 at once (load balancers stop
        # routing here) and new requests on kept-alive connections get 503 while the
        # in-flight ones finish; those still open after the shutdown timeout are ended
        # cleanly (error chunk + [DONE], or a 503) before the HTTP server gives up on them.
        if state["shutting_down"]:
            return
        state["shutting_down"] = True
        loop = state.get("loop")
        if loop is not None:
            loop.call_soon_threadsafe(loop.call_later, settings.shutdown_timeout_s,
                                      end_open_requests)

    def end_now() -> None:
        # A second Ctrl-C: end every open request at once, each in its proper shape (a stream
        # with an error chunk and [DONE], a non-streamed request with a 503), rather than cut.
        state["shutting_down"] = True
        loop = state.get("loop")
        if loop is not None:
            loop.call_soon_threadsafe(end_open_requests, "second SIGINT")

    app.state.begin_drain = begin_drain
    app.state.end_now = end_now
    if settings.api_key:
        app.add_middleware(BearerAuth, api_key=settings.api_key,
                           on_fail=lambda: metrics.failure("unauthorized"))
    if settings.cors_origins:
        # Added after auth = outside it: a browser's preflight OPTIONS is answered before auth.
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           expose_headers=["X-Request-Id"])
    app.add_middleware(RequestId)  # outermost: every response has the header, 401s included

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
            check_media_type(request)
            raw = await read_body(request, settings.max_body_bytes, settings.read_timeout_s)
            body = await parse_json_off_loop(raw)
            del raw  # a 4 MB body need not live as long as its generation
            client.set(request.client.host if request.client else None)
            return await race_disconnect(request, work(body, arrival))
        except ApiError as exc:
            log.debug("%s refused: %d %s", request.url.path, exc.status, exc.message[:200])
            metrics.failure(exc.reason)
            return exc.response()
        except (ClientGone, ClientDisconnect):  # the client left (while sending, too)
            metrics.failure("aborted")
            return Response(status_code=499)
        except Exception as exc:  # a bug here must still answer in the OpenAI shape
            log.exception("unhandled error")
            err = engine_error(exc)
            metrics.failure(err.reason)
            return err.response()

    # ---------------------------------------------------------------- routes

    request_models: dict[str, type[Any]] = {}

    def post(path: str, work: Callable[[Any, float], Awaitable[Response]],
             request_model: type[Any], response_model: type[Any], stream: bool = False) -> None:
        async def route(request: Request) -> Response:
            return await handle(request, work)

        # Named as the route functions were (`_chat`, ...): OpenAPI's operation ids stay.
        app.add_api_route(path, route, methods=["POST"], name=f"_{work.__name__}",
                          responses=openapi.post_responses(response_model, stream))
        request_models[path] = request_model

    # Each POST route's work (body -> engine -> response) is a method of `Handlers`.
    post("/v1/completions", handlers.completions, P.CompletionRequest, P.CompletionResponse,
         stream=True)
    post("/v1/chat/completions", handlers.chat, P.ChatCompletionRequest,
         P.ChatCompletionResponse, stream=True)
    post("/tokenize", handlers.tokenize, P.TokenizeRequest, P.TokenizeResponse)
    post("/detokenize", handlers.detokenize, P.DetokenizeRequest, P.DetokenizeResponse)
    openapi.install(app, request_models)

    def model_cards() -> list[P.ModelCard]:
        cfg = family.config
        cards = [P.ModelCard(id=family.name, root=cfg.base, max_model_len=ctx, eft={
            "base": cfg.base, "reference": cfg.reference, "experts": list(cfg.experts),
            "defaults": dict(cfg.defaults), "max_weight": float(getattr(cfg, "max_weight", 4.0)),
            "aliases": {a: t for a, t in P.KNOB_ALIASES.items() if t in cfg.experts},
            "filters": ["base_top_p", "plausibility"]})]
        for mid, name in single_model_ids(family).items():
            cards.append(P.ModelCard(id=mid, root=name, parent=family.name, max_model_len=ctx))
        return cards

    @app.get("/v1/models", responses={200: {"model": P.ModelList},
                                      **openapi.error_responses(401)})
    async def _models() -> Response:
        return JSONResponse(P.ModelList(data=model_cards()).model_dump(mode="json"))

    @app.get("/v1/models/{model_id:path}", responses={200: {"model": P.ModelCard},
                                                      **openapi.error_responses(401, 404)})
    async def _model(model_id: str) -> Response:
        for card in model_cards():
            if card.id == model_id:
                return JSONResponse(card.model_dump(mode="json"))
        metrics.failure("not_found")
        return ApiError(404, f"The model `{model_id}` does not exist.", param="model",
                        code="model_not_found", reason="not_found").response()

    @app.get("/health", responses={200: {"model": P.HealthResponse},
                                   503: {"model": P.HealthResponse,
                                         "description": "The engine's step loop is gone."}})
    async def _health() -> Response:
        # Liveness: cheap, no generation. 503 only when the step loop is gone for good.
        dead = _engine_dead(engine)
        if dead:
            return JSONResponse({"status": "dead", "error": dead}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/version", responses={200: {"model": P.VersionResponse}})
    async def _version() -> Response:
        # Open like /health: which build answers is what an operator or a probe asks first.
        return JSONResponse({"version": package_version()})

    @app.get("/ready", responses={200: {"model": P.ReadyResponse},
                                  503: {"model": P.ReadyResponse,
                                        "description": "Warming up, failed, or shutting down."}})
    async def _ready() -> Response:
        if state["shutting_down"]:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if getattr(engine, "ready", False):
            return JSONResponse({"status": "ready", "models": list(family.models)})
        body: dict[str, Any] = {"status": "warming up"}
        if state["warmup_error"]:
            body = {"status": "warmup failed", "error": state["warmup_error"]}
        return JSONResponse(body, status_code=503)

    @app.get("/metrics", responses={200: {"description": "Prometheus text format.", "content": {
        "text/plain": {"schema": {"type": "string"}}}}})
    async def _metrics() -> Response:
        data, ctype = metrics.render()
        return PlainTextResponse(data, media_type=ctype)

    return app


def _engine_dead(engine: Any) -> str | None:
    """Why the step loop is gone, or None while it serves."""
    return engine.dead
