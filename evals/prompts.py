"""Prompt files: JSONL, one object per line.

Keys: `prompt` (a string, sent to /v1/completions unless --endpoint chat) or `messages` (an
OpenAI chat list, sent to /v1/chat/completions); optional `expected` (a string or a list of
strings, for the `contains`, `exact` and `regex` scorers), `id` (default: the line number),
`completion` (with --echo: the text whose tokens are scored, after `prompt`). Any other key is
kept and handed to custom scorers. Blank lines and lines starting with `#` are skipped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class PromptError(ValueError):
    """A prompt file that cannot be used."""


@dataclass(frozen=True)
class Item:
    label: str
    id: str
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    expected: tuple[str, ...] | None = None
    completion: str | None = None
    record: dict[str, Any] = field(default_factory=dict)  # the line as written

    def as_dict(self) -> dict[str, Any]:
        """What a custom scorer receives: the line's own keys plus `label` and `id`."""
        return {**self.record, "label": self.label, "id": self.id}


@dataclass(frozen=True)
class PromptSet:
    label: str
    items: tuple[Item, ...]
    source: str  # the path, or a description for sets built in code
    sha256: str  # of the content, so a resumed sweep notices an edited file


def item_from_record(record: dict[str, Any], label: str, default_id: str) -> Item:
    where = f"{label} {default_id}"
    if not isinstance(record, dict):
        raise PromptError(f"{where}: each line must be a JSON object")
    prompt, messages = record.get("prompt"), record.get("messages")
    if (prompt is None) == (messages is None):
        raise PromptError(f"{where}: give exactly one of `prompt` and `messages`")
    if prompt is not None and not isinstance(prompt, str):
        raise PromptError(f"{where}: `prompt` must be a string")
    if messages is not None and (
        not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages)
    ):
        raise PromptError(f"{where}: `messages` must be a list of message objects")
    expected = record.get("expected")
    if expected is not None:
        if isinstance(expected, str):
            expected = (expected,)
        elif isinstance(expected, list) and all(isinstance(e, str) for e in expected):
            expected = tuple(expected)
        else:
            raise PromptError(f"{where}: `expected` must be a string or a list of strings")
    completion = record.get("completion")
    if completion is not None and not isinstance(completion, str):
        raise PromptError(f"{where}: `completion` must be a string")
    return Item(
        label=label,
        id=str(record.get("id", default_id)),
        prompt=prompt,
        messages=messages,
        expected=expected,
        completion=completion,
        record=record,
    )


def prompt_set(label: str, records: list[dict[str, Any]], source: str = "<code>") -> PromptSet:
    """A prompt set from records built in code (what `load_prompts` does for a file's lines)."""
    items = tuple(item_from_record(r, label, str(i)) for i, r in enumerate(records, 1))
    if not items:
        raise PromptError(f"{label}: no prompts")
    ids = [i.id for i in items]
    if len(set(ids)) != len(ids):
        raise PromptError(f"{label}: ids repeat")
    digest = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()
    return PromptSet(label, items, source, digest)


def load_prompts(option: str) -> PromptSet:
    """`[LABEL=]PATH`: a JSONL file, labelled LABEL (default: the file name without suffix)."""
    label, sep, path = option.partition("=")
    if not sep or "/" in label or not label:
        label, path = Path(option).stem, option
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as exc:
        raise PromptError(f"--prompts {option}: {exc}") from exc
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptError(f"{p}:{n}: not JSON: {exc}") from exc
        if isinstance(record, dict):
            record.setdefault("id", str(n))
        records.append(record)
    ps = prompt_set(label, records, str(p))
    return ps
