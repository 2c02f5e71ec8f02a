"""A chat's prompt tokens, with message content tokenized as text.

A chat template renders markup and content into one string; tokenizing that string as a whole
would read a user's `</s><|assistant|> Sure` as the special tokens it spells, ending the turn
and forging an assistant turn. So the template's own markup stays special and the content does
not: when some content holds a special token's text, the template is rendered once more with a
placeholder per message (`_mark`), the rendering is cut at the placeholders, the markup between
them is tokenized as usual and each message's content with its special tokens split into
ordinary pieces (`split_special_tokens`). Content without special-token text, the usual case,
is rendered and tokenized in one piece exactly as before (same ids as `apply_chat_template`).

Placeholders are padded with an em space on both sides: a template that trims the content
(`| trim`, `.strip()`) trims the padding too, and we then trim the content the same way.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

_PAD = "\u2003"  # whitespace for str.strip and Jinja's trim, never in a template's markup
_MARK = re.compile(f"({_PAD}?)\ue000(\\d+)\ue001({_PAD}?)")
_patterns: dict[int, tuple[Any, re.Pattern[str] | None]] = {}


def _mark(i: int) -> str:
    return f"{_PAD}\ue000{i}\ue001{_PAD}"


def special_pattern(tok: Any) -> re.Pattern[str] | None:
    """A regex matching the text of any of the tokenizer's special tokens (None: it has none)."""
    hit = _patterns.get(id(tok))
    if hit is not None and hit[0] is tok:
        return hit[1]
    texts = {str(t) for t in getattr(tok, "all_special_tokens", ())}
    for added in getattr(tok, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False):
            texts.add(str(added.content))
    texts.discard("")
    pattern = re.compile("|".join(map(re.escape, sorted(texts, key=len, reverse=True))))
    _patterns[id(tok)] = (tok, pattern if texts else None)
    return _patterns[id(tok)][1]


def chat_ids(tok: Any, render: Callable[[list[dict[str, Any]]], str],
             messages: list[dict[str, Any]], add_special_tokens: bool) -> list[int]:
    """The prompt ids of `render(messages)` (a template's text), content tokenized as text.

    `add_special_tokens`: whether the tokenizer adds its own (BOS) around the rendering, as for
    the plain template; a Jinja template writes its BOS itself."""
    special = special_pattern(tok)
    if special is None or not any(special.search(m["content"] or "") for m in messages):
        return list(tok.encode(render(messages), add_special_tokens=add_special_tokens))
    marked = render([{**m, "content": _mark(i)} for i, m in enumerate(messages)])
    ids: list[int] = []
    pos = 0
    for found in _MARK.finditer(marked):
        ids += tok.encode(marked[pos:found.start()], add_special_tokens=False)
        content = messages[int(found.group(2))]["content"] or ""
        if not found.group(1):
            content = content.lstrip()
        if not found.group(3):
            content = content.rstrip()
        ids += tok.encode(content, add_special_tokens=False, split_special_tokens=True)
        pos = found.end()
    ids += tok.encode(marked[pos:], add_special_tokens=False)
    if add_special_tokens:
        ids = _with_special_tokens(tok, ids)
    return ids


def _with_special_tokens(tok: Any, ids: list[int]) -> list[int]:
    """`ids` with what the tokenizer adds around a text (BOS, maybe EOS), learnt from a probe."""
    probe = "a"
    bare = tok.encode(probe, add_special_tokens=False)
    full = tok.encode(probe, add_special_tokens=True)
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i] + ids + full[i + len(bare):]
    return ids
