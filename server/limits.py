"""What one request may cost, checked before the cost is spent.

Body bytes (413) and JSON shape (`server.body`) come first; then, before validation, the message
count against the context (every chat message renders at least one token, so more messages
than the context holds tokens cannot fit) and token-id lists against it; before any template
rendering or tokenization the sequences (prompts x n) against `--max-seqs-per-request`, and the
text's characters against what the context can spell (`Handlers.check_text_size`). Once the
prompts are tokenized, and before the engine sees them, the response's size is estimated from
prompts x n x (prompt + max_tokens) x entries per token (logprob alternatives, trace entries)
and refused over `--max-response-bytes`: a 49 KB request could otherwise ask for hundreds of MB
of JSON.

The byte figures below are a typical entry's size on the wire (a token, a float written in full,
JSON punctuation), on the high side, so that the estimate bounds the real size in practice.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.errors import bad_request

TOKEN_BYTES = 24  # a generated token's text and offsets in a non-streamed response
STREAM_TOKEN_BYTES = 200  # a streamed token's chunk: id, model, choice, delta, `data: ` framing
LOGPROB_ENTRY_BYTES = 48  # one (token, log-prob) pair: chosen or an alternative
TRACE_BYTES = 160  # a trace entry without its per-model figures
TRACE_MODEL_BYTES = 64  # each model's log-prob (and an expert's reward) in a trace entry


@dataclass
class ResponseShape:
    """What a request asks to get back per token."""

    n: int
    max_tokens: int
    stream: bool = False
    echo: bool = False  # the prompt's text comes back too
    logprobs: int | None = None  # alternatives per generated token
    prompt_logprobs: int | None = None  # alternatives per prompt token
    trace: bool = False
    trace_models: int = 0

    def per_generated_token(self) -> int:
        size = STREAM_TOKEN_BYTES if self.stream else TOKEN_BYTES
        if self.logprobs is not None:
            size += (self.logprobs + 1) * LOGPROB_ENTRY_BYTES
        if self.trace:
            size += TRACE_BYTES + self.trace_models * TRACE_MODEL_BYTES
        return size

    def per_prompt_token(self) -> int:
        size = TOKEN_BYTES if self.echo else 0
        if self.prompt_logprobs is not None:
            size += (self.prompt_logprobs + 1) * LOGPROB_ENTRY_BYTES
            if self.trace:
                size += TRACE_BYTES + self.trace_models * TRACE_MODEL_BYTES
        return size

    def estimate(self, prompt_lens: list[int]) -> int:
        """Bytes of the whole response for prompts of these lengths (each answered n times)."""
        gen, prompt = self.per_generated_token(), self.per_prompt_token()
        return self.n * sum(length * prompt + self.max_tokens * gen for length in prompt_lens)


def check_response_size(shape: ResponseShape, prompt_lens: list[int], limit: int) -> int:
    """The estimate, when it is within `limit`."""
    size = shape.estimate(prompt_lens)
    if size > limit:
        raise bad_request(
            f"This request's response would be about {size} bytes ({len(prompt_lens)} "
            f"prompt(s) x n={shape.n} x (prompt + max_tokens={shape.max_tokens}) tokens, with "
            "their logprobs and trace entries), more than this server's --max-response-bytes "
            f"({limit}). Ask for fewer prompts, n, max_tokens, logprobs or no trace.",
            param="max_tokens",
            code="response_too_large",
        )
    return size


def check_sequences(prompts: int, n: int, limit: int) -> None:
    """prompts x n against --max-seqs-per-request, before any prompt is tokenized."""
    if prompts * n > limit:
        raise bad_request(
            f"This request asks for {prompts * n} sequences ({prompts} prompt(s) x n={n}); one "
            f"request may have at most {limit} (--max-seqs-per-request, within --max-waiting).",
            param="n",
            code="too_many_sequences",
        )


def check_message_count(body: object, limit: int) -> None:
    """On the raw body, before validation: a chat that cannot fit is refused by its length
    alone (validating and rendering 200,000 empty messages takes many seconds)."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if isinstance(messages, list) and len(messages) > limit:
        raise bad_request(
            f"messages: {len(messages)} messages cannot fit this model's maximum context "
            f"length of {limit} tokens (every message takes at least one token).",
            param="messages",
            code="context_length_exceeded",
        )


def check_token_lists(body: object, field: str, limit: int) -> None:
    """On the raw body, before validation: a list of token ids longer than the context cannot
    fit (validating 2 M ids takes the event loop most of a second). `field` holds ids, or (for
    `prompt`) a list of such lists."""
    value = body.get(field) if isinstance(body, dict) else None
    if not isinstance(value, list):
        return
    lists = [value] if not value or not isinstance(value[0], list) else value
    for ids in lists:
        if isinstance(ids, list) and len(ids) > limit:
            raise bad_request(
                f"{field}: {len(ids)} token ids cannot fit this model's maximum context length "
                f"of {limit} tokens.",
                param=field,
                code="context_length_exceeded",
            )
