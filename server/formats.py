"""Structured outputs on the wire -> one llguidance grammar text for the engine.

OpenAI's `response_format` (`json_object`, `json_schema`) and vLLM's `structured_outputs`
(`json`, `regex`, `choice`, `grammar`, `json_object`) all become a grammar that the engine
compiles once per text (`decoding.grammar`) and enforces on the composed distribution.
JSON is generated compact (no whitespace between tokens), which keeps a small model from
spending its budget on blank space; a schema can ask otherwise through llguidance's
`"x-guidance"` options.
"""

from __future__ import annotations

import json
from typing import Any

from llguidance import LLMatcher
from llguidance.gbnf_to_lark import any_to_lark

from . import protocol as P
from .errors import bad_request

JSON_OPTIONS = {"whitespace_flexible": False}


def grammar_of(req: P.CompletionRequest | P.ChatCompletionRequest) -> tuple[str, str] | None:
    """(grammar text, the request field it came from), or None for unconstrained text.
    Raises a 400 when a field cannot be turned into a grammar at all."""
    so = req.structured_outputs
    if so is not None:
        return _structured(so), "structured_outputs"
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return _json_schema({"type": "object"}, "response_format"), "response_format"
    assert rf.json_schema is not None  # the protocol requires it for json_schema
    schema = rf.json_schema.schema_
    # OpenAI's schema is optional: without one any JSON value fits.
    return _json_schema({} if schema is None else schema, "response_format.json_schema.schema"), (
        "response_format"
    )


def _structured(so: P.StructuredOutputs) -> str:
    param = "structured_outputs"
    if so.json_ is not None:
        schema = so.json_
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise bad_request(f"{param}.json: not valid JSON: {exc}", param=param) from exc
        return _json_schema(schema, f"{param}.json")
    if so.json_object:
        return _json_schema({"type": "object"}, param)
    if so.regex is not None:
        return LLMatcher.grammar_from_regex(so.regex)
    if so.choice is not None:
        # Lark string literals take JSON's escapes: any choice text is spelled exactly.
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in so.choice)
        return LLMatcher.grammar_from_lark(f"start: {alternatives}\n")
    assert so.grammar is not None
    try:
        lark = any_to_lark(so.grammar)  # GBNF (llama.cpp, xgrammar) or Lark as it is
    except Exception as exc:  # noqa: BLE001 - the converter raises plain exceptions
        raise bad_request(f"{param}.grammar: {exc}", param=param) from exc
    return LLMatcher.grammar_from_lark(lark)


def _json_schema(schema: Any, where: str) -> str:
    if not isinstance(schema, dict | bool):
        raise bad_request(f"{where}: a JSON Schema must be an object", param=where.split(".")[0])
    try:
        return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except Exception as exc:  # noqa: BLE001 - whatever the converter raises, the schema is bad
        raise bad_request(f"{where}: {exc}", param=where.split(".")[0]) from exc

