"""Request and response models of the HTTP API: the OpenAI schema plus the `eft` extension.

Requests are lenient like vLLM's (`extra="allow"`): an OpenAI field this server does not
implement is accepted and ignored rather than refused, because SDKs add new fields all the time;
the exceptions are fields whose silent omission changes what the client gets back (`tools`,
`functions` and their `*_choice`/`function_call`, `logit_bias`): those are refused with a 400
naming the field. Structured outputs (`response_format`, vLLM's `structured_outputs`) are
served; `server.formats` turns them into a grammar.
Fields it *does* implement are validated strictly (JSON types included), so that a bad value is a
400 naming the field (`param`), never a silent clamp or coercion. These models are also the
request schemas of `/openapi.json` (`server.openapi`). Family-specific checks (which experts
exist, the context limit) need the loaded family and live in `server.handlers`.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Bounds (contract, documented in README.md, API reference).
MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP = 8
MAX_STOP_TOKEN_IDS = 64
MAX_PROMPTS = 64  # prompts in one completions request (each becomes its own engine request)
INT64_MAX = 2**63 - 1

# Knob aliases: the contract names the expert `helpful`, but people type the noun.
KNOB_ALIASES = {"helpfulness": "helpful", "harmlessness": "harmless"}


class OpenAIBaseModel(BaseModel):
    # Unknown fields are kept (and ignored), as vLLM does; `eft` is the only extension we read.
    # Types are strict, as OpenAI's are: "5" is not an integer, "true" not a boolean, `false`
    # not a token id (an integer is still a valid float).
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


# `eft` keys that are switches rather than knobs: true or false.
EFT_FLAGS = ("trace", "speculative")


def _check_knobs(v: Any) -> dict[str, float | bool] | None:
    """Type-level knob checks: a flat object of finite numbers (and the boolean switches
    `trace`, `speculative`). Names are checked per family."""
    if v is None:
        return None
    if not isinstance(v, dict):
        raise ValueError("eft must be an object of knob names to numbers")
    out: dict[str, float | bool] = {}
    for key, value in v.items():
        if key in EFT_FLAGS:
            if not isinstance(value, bool):
                raise ValueError(f"eft.{key} must be true or false")
            out[key] = value
            continue
        # bool is an int subclass in Python; `true` as a weight is almost surely a client bug.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"eft.{key} must be a number, not {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"eft.{key} must be a finite number")
        out[str(key)] = float(value)
    return out


class JsonSchemaFormat(OpenAIBaseModel):
    """OpenAI's `response_format.json_schema`."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    # `schema` would shadow a BaseModel attribute: the wire name is an alias.
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # every schema is enforced; accepted for compatibility


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format: type 'json_schema' needs a json_schema object")
        return self


class StructuredOutputs(OpenAIBaseModel):
    """vLLM's `structured_outputs` extra field: exactly one constraint."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")  # a JSON Schema
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None  # EBNF (GBNF) or Lark
    json_object: bool | None = None

    @model_validator(mode="after")
    def _one(self) -> StructuredOutputs:
        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(
                "structured_outputs: give exactly one of json, regex, choice, grammar, "
                "json_object"
            )
        return self


GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
          "guided_grammar": "grammar"}


class _SamplingFields(OpenAIBaseModel):
    """Fields common to completions and chat (OpenAI + vLLM extras + `eft`)."""

    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    skip_special_tokens: bool = True
    # structured outputs: OpenAI's, and vLLM's extra field
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # the extension
    eft: dict[str, Any] | None = None  # knob -> weight or filter value; `trace`, `speculative`

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("eft", mode="before")
    @classmethod
    def _eft(cls, v: Any) -> dict[str, float | bool] | None:
        return _check_knobs(v)

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        # Not implemented by the engine: refusing beats silently sampling something else.
        if v:
            raise ValueError("logit_bias is not supported by this server")
        return v

    @model_validator(mode="after")
    def _stream_options(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError(
                "stream_options: Stream options can only be defined when `stream=True`.")
        return self

    @model_validator(mode="before")
    @classmethod
    def _guided(cls, data: Any) -> Any:
        # vLLM's older spelling (`guided_json`, `guided_regex`, `guided_choice`,
        # `guided_grammar`) means `structured_outputs`; ignoring it would drop the constraint.
        if not isinstance(data, dict):
            return data
        old = {k: data[k] for k in GUIDED if data.get(k) is not None}
        if not old:
            return data
        if data.get("structured_outputs") is not None:
            raise ValueError("structured_outputs: send it or the guided_* fields, not both")
        rest = {k: v for k, v in data.items() if k not in GUIDED}
        return {**rest, "structured_outputs": {GUIDED[k]: v for k, v in old.items()}}

    @model_validator(mode="after")
    def _one_format(self) -> _SamplingFields:
        if (self.structured_outputs is not None and self.response_format is not None
                and self.response_format.type != "text"):
            raise ValueError("structured_outputs: send it or a non-text response_format, not both")
        return self

    @model_validator(mode="after")
    def _no_tool_calls(self) -> _SamplingFields:
        # Tool calling is not implemented. Accepting `tools` and answering in plain text would
        # let an agent loop believe the model chose not to call anything, so anything that asks
        # for a call is a 400 naming the parameter; `tool_choice: "none"` asks for none and is
        # honoured as it is (the tools are then only context the server does not render).
        _refuse_calls(self.model_extra or {}, "tools", "tool_choice")
        _refuse_calls(self.model_extra or {}, "functions", "function_call")
        return self


def _refuse_calls(extra: dict[str, Any], tools_key: str, choice_key: str) -> None:
    """400 (via ValueError "<param>: ...") when a request asks for tool or function calls."""
    choice = extra.get(choice_key)
    if choice is not None and choice != "none":
        raise ValueError(
            f"{choice_key}: tool calling is not supported by this server; "
            f'leave {choice_key} out or send "none"'
        )
    if extra.get(tools_key) and choice != "none":
        raise ValueError(
            f"{tools_key}: tool calling is not supported by this server; "
            f'send no {tools_key}, or {choice_key}: "none"'
        )


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM extra
    add_special_tokens: bool = True

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if len(v) > MAX_PROMPTS and not isinstance(v[0], int):
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
            if any(isinstance(x, list) and not x for x in v):
                raise ValueError("a token-id prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _checks(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of == n is supported")
        if self.suffix:
            raise ValueError("suffix: not supported by this server")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is only allowed with echo (prompt scoring)")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens: must be <= max_tokens")
        return self


class ContentPart(OpenAIBaseModel):
    type: str
    text: str | None = None


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content parts of type {part.type!r} are not supported")
            parts.append(part.text)
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        limit = self.max_tokens_asked
        if limit is not None and self.min_tokens > limit:
            raise ValueError("min_tokens: must be <= max_tokens")
        return self

    @property
    def max_tokens_asked(self) -> int | None:
        # `max_completion_tokens` is the newer OpenAI name; it wins when both are sent.
        return self.max_completion_tokens or self.max_tokens


class TokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------- responses


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class SpeculativeUsage(BaseModel):
    """`usage.eft_speculative`: what speculative decoding did for this request (all choices)."""

    drafted_tokens: int  # tokens the drafting model proposed
    accepted_tokens: int  # ... that the verification accepted


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # Extension, present only when the request speculated (OpenAI clients keep extra fields).
    eft_speculative: SpeculativeUsage | None = Field(None, exclude_if=lambda v: v is None)


class CompletionLogprobs(BaseModel):
    """The legacy completions format: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class TraceToken(BaseModel):
    """One token of `"eft": {"trace": true}`: each model's log-prob of it, by role."""

    token_id: int
    token: str
    logprob: float  # under the composed distribution
    base: float | None  # lp_base (None when the request did not use the base)
    reference: float | None  # lp_reference
    experts: dict[str, float]  # lp_e of each expert the request used
    rewards: dict[str, float]  # implicit reward r_e = lp_e - lp_reference
    changed_vs_base: bool | None  # the token is not the base model's own argmax
    changed_vs_expert: bool | None  # ... nor the strongest expert's own argmax


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # vLLM's, when asked for
    trace: list[TraceToken] | None = None  # with "eft": {"trace": true}
    prompt_trace: list[TraceToken | None] | None = None  # ... and echo scoring


def _now() -> int:
    return int(time.time())


class _ResponseBase(BaseModel):
    """What a completion or chat response and each of their stream chunks carry.

    Subclasses narrow `object` and `choices` (and make `usage` required off the stream); a
    field a subclass redeclares keeps its place here, so the JSON keys keep OpenAI's order.
    """

    id: str
    object: str
    created: int = Field(default_factory=_now)
    model: str
    choices: list[Any]
    usage: UsageInfo | None = None  # in a stream: the last chunk's, with include_usage
    eft: dict[str, float] | None = None


class CompletionResponse(_ResponseBase):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(_ResponseBase):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobToken] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    trace: list[TraceToken] | None = None  # with "eft": {"trace": true}


class ChatCompletionResponse(_ResponseBase):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    trace: list[TraceToken] | None = None  # this chunk's tokens, with "eft": {"trace": true}


class ChatCompletionStreamResponse(_ResponseBase):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatStreamChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "eft-serve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    eft: dict[str, Any] | None = None  # on the family id: roles, experts, defaults, bounds


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(BaseModel):
    status: str
    error: str | None = None


class VersionResponse(BaseModel):
    version: str


class ReadyResponse(BaseModel):
    status: str
    models: list[str] | None = None
    error: str | None = None


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str
