"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the right status.

Every refusal goes through `ApiError`, so each carries its metric `reason` too. Validation is
always 400 (like vLLM, unlike FastAPI's default 422), and a client error is never a 500.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        reason: str = "validation",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.reason = reason  # label of eft_request_failure_total
        self.headers = headers

    def body(self) -> dict[str, Any]:
        # A message may quote client input; whatever it holds, the body must encode as UTF-8.
        return {"error": {"message": _utf8(self.message), "type": self.type,
                          "param": _utf8(self.param), "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _utf8(text: str | None) -> str | None:
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def not_found_model(model: str, known: list[str]) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist. Available models: "
                    f"{', '.join(known)}.", param="model", code="model_not_found",
                    reason="not_found")


# "eft.helpful must be ..." or "stream_options: ..." -> the parameter the message is about.
_PARAM_PREFIX = re.compile(r"^([A-Za-z_][\w]*(?:\.[\w.-]+)?)(?::|\s)")


def from_validation_error(exc: ValidationError) -> ApiError:
    """The first pydantic error as a 400 whose `param` is the dotted field path."""
    err = exc.errors(include_url=False)[0]
    msg = str(err.get("msg", "invalid request"))
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    loc = [str(p) for p in err.get("loc", ())]
    # Union types put the tried type's name into loc ("prompt.str"); keep the field names only.
    loc = [p for p in loc if not _looks_like_type(p)]
    param = ".".join(loc) or None
    m = _PARAM_PREFIX.match(msg)
    if m and (param is None or m.group(1).startswith(f"{param}.")):
        param = m.group(1)
    if param and not msg.startswith(param):
        msg = f"{param}: {msg}"
    if err.get("type") == "missing":
        msg = f"{param}: field required"
    return bad_request(msg, param=param)


def _looks_like_type(p: str) -> bool:
    return p in {"str", "int", "float", "bool", "list[str]", "list[int]", "list[list[int]]",
                 "dict[str,any]", "list[ContentPart]", "function-after[_prompt(), union]"} or (
        "[" in p and "]" in p
    )
