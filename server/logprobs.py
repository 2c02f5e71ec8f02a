"""The three log-prob formats of the API, built from the engine's `TokenLogprob`s.

- completions (legacy OpenAI): parallel lists `tokens`, `token_logprobs`, `top_logprobs`
  (dicts token -> logprob; the chosen token is always included, as vLLM does) and
  `text_offset`. With `echo` the prompt's entries come first, the first of them null: nothing
  precedes the first prompt token, so it has no log-prob.
- chat: `content[]` of `{token, logprob, bytes, top_logprobs[]}`.
- vLLM's `prompt_logprobs`: per prompt position a dict token id -> {logprob, decoded_token}.
"""

from __future__ import annotations

import math
from typing import Any

from decoding.request import TokenLogprob
from server import protocol as P
from server.tokens import TokenText


def finite(x: float) -> float:
    # JSON has no -inf; vLLM reports -9999.0 for a token the distribution rules out.
    return x if math.isfinite(x) else -9999.0


def _append(out: P.CompletionLogprobs, tt: TokenText, token_id: int, e: TokenLogprob | None,
            offset: int) -> int:
    s = tt.text(token_id)
    out.tokens.append(s)
    if e is None:
        out.token_logprobs.append(None)
        out.top_logprobs.append(None)
    else:
        out.token_logprobs.append(finite(e.logprob))
        top = {tt.text(t): finite(lp) for t, lp in e.top}
        top.setdefault(s, finite(e.logprob))
        out.top_logprobs.append(top)
    out.text_offset.append(offset)
    return offset + len(s)


def completion_logprobs(tt: TokenText, generated: list[TokenLogprob], offset: int = 0,
                        prompt_ids: list[int] | None = None,
                        prompt: list[TokenLogprob | None] | None = None,
                        ) -> tuple[P.CompletionLogprobs, int]:
    """Legacy format; with `prompt_ids` (echo scoring) the prompt's entries come first.

    Returns the object and the text offset after it (a stream continues from there).
    """
    out = P.CompletionLogprobs()
    if prompt_ids is not None:
        entries = prompt or [None] * len(prompt_ids)
        for tid, e in zip(prompt_ids, entries, strict=False):
            offset = _append(out, tt, tid, e, offset)
    for e in generated:
        offset = _append(out, tt, e.token_id, e, offset)
    return out, offset


def vllm_prompt_logprobs(tt: TokenText, entries: list[TokenLogprob | None] | None
                         ) -> list[dict[str, Any] | None] | None:
    if entries is None:
        return None
    res: list[dict[str, Any] | None] = []
    for e in entries:
        if e is None:
            res.append(None)
            continue
        d = {str(t): {"logprob": finite(lp), "decoded_token": tt.text(t)} for t, lp in e.top}
        d[str(e.token_id)] = {"logprob": finite(e.logprob), "decoded_token": tt.text(e.token_id)}
        res.append(d)
    return res


def chat_logprobs(tt: TokenText, entries: list[TokenLogprob], k: int) -> P.ChatLogprobs:
    content = []
    for e in entries:
        tops = [P.TopLogprob(token=tt.text(t), logprob=finite(lp), bytes=tt.bytes(t))
                for t, lp in e.top[:k]]
        content.append(P.ChatLogprobToken(token=tt.text(e.token_id), logprob=finite(e.logprob),
                                          bytes=tt.bytes(e.token_id), top_logprobs=tops))
    return P.ChatLogprobs(content=content)
