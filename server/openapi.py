"""`/openapi.json` as the API really is: request bodies, responses and every error status.

The POST routes read their bodies by hand (so that every client error is a 400 in OpenAI's
shape, never FastAPI's 422), which leaves FastAPI nothing to document. The request schemas are
therefore added here from the same pydantic models that validate the bodies (`server.protocol`),
each route lists the statuses it can answer with `ErrorResponse` as their body, and FastAPI's
422 (which this server never sends) is removed.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server import protocol as P

_REF = "#/components/schemas/{model}"

ERROR_STATUSES = {
    400: "Invalid request: bad JSON, a field of the wrong type or out of range, an unknown "
    "knob, a prompt beyond the context length.",
    401: "Missing or wrong API key (when the server runs with --api-key).",
    404: "Unknown model.",
    408: "The request body did not arrive within the read timeout.",
    413: "The request body is larger than the server accepts.",
    415: "The body is not `application/json`.",
    429: "The waiting queue is full; retry after `Retry-After` seconds.",
    500: "The engine failed the generation (e.g. a NaN in the model's output).",
    503: "The engine is not running, or the server is shutting down.",
}
_REQUEST_ID = {
    "X-Request-Id": {
        "description": "The client's X-Request-Id when it sent a usable one, else a new id.",
        "schema": {"type": "string"},
    }
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": P.ErrorResponse, "description": ERROR_STATUSES[status]}
        if status == 429:
            entry["headers"] = {
                "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}
            }
        out[status] = entry
    return out


def post_responses(response: type[BaseModel], stream: bool) -> dict[int | str, dict[str, Any]]:
    ok: dict[str, Any] = {"model": response, "description": "The result."}
    if stream:
        ok["description"] = (
            "The result; with `stream: true` a `text/event-stream` of "
            "`data: {chunk}` lines, comment pings and `data: [DONE]`."
        )
        # OpenAPI before 3.2 describes each server-sent event with `schema`.
        event = {
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {
                    "type": "string",
                    "description": 'A chunk as JSON, an `{"error": ...}` object, or `[DONE]`.',
                },
                "event": {"type": "string"},
            },
        }
        ok["content"] = {"text/event-stream": {"schema": event}}
    return {200: ok, **error_responses(400, 401, 404, 408, 413, 415, 429, 500, 503)}


def install(app: FastAPI, request_models: dict[str, type[BaseModel]]) -> None:
    """Replace `app.openapi` by a generator that adds `request_models` ({path: model}) as the
    JSON request bodies of those POST routes."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(
            title=app.title,
            version=app.version,
            routes=app.routes,
            description="OpenAI-compatible API with emulated fine-tuning knobs "
            "(`eft`); see the repository's docs/.",
        )
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        models = sorted(set(request_models.values()), key=lambda m: m.__name__)
        keys, defs = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
        schemas.update(defs.get("$defs", {}))
        for path, model in request_models.items():
            op = doc["paths"][path]["post"]
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": keys[(model, "validation")]}},
            }
        for item in doc["paths"].values():
            for op in item.values():
                op.get("responses", {}).pop("422", None)
                for resp in op.get("responses", {}).values():
                    resp.setdefault("headers", {}).update(_REQUEST_ID)
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
