"""Where the assistant's answer starts: every model of a family must begin it alike.

EFT adds the models' log-probabilities token by token from the first answer token on, so every
model must expect that token under the same whitespace convention. A base prompted with
`User: …\\nAssistant:` expects a space-led first word (" The"); a chat model whose template ends
`<|im_start|>assistant\\n` (Qwen2.5, SmolLM2; Llama-3 ends `\\n\\n`, Gemma-3 `model\\n`) expects
a bare one ("The"). Composed, the base's nucleus keeps only space-led tokens, the expert
dislikes all of them, and the answer falls apart. Hence:

- `plain` ends with the whitespace the family's own chat templates end with
  (`answer_whitespace`), so a base rendered `plain` starts its answer as the chat experts do;
- `textual_verdict` compares the renderings of one probe conversation without weights (their
  trailing whitespace, and the token a bare first word becomes after each): `eft-serve --check`;
- `weights_verdict` compares the first answer token each composed model prefers on that probe
  (its leading whitespace and id): the engine runs it once at startup and logs one warning line
  when the models disagree.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

PROBE = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER_WORD = "The"  # a bare first word to append after each rendering (textual check)
_TRAILING_WS = re.compile(r"\s*\Z")
ADVICE = (
    "give base models `chat_template: plain` (it ends like the experts' templates) or "
    "templates that end in the same whitespace as the experts' (docs/family.md#answer-boundary)"
)


def effective_template(tokenizer: Any, template: str) -> str:
    """`tokenizer` without a chat template of its own falls back to `plain`."""
    return "plain" if template == "tokenizer" and not tokenizer.chat_template else template


def plain_text(messages: list[dict[str, Any]], answer_ws: str) -> str:
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:" + answer_ws


def render_text(
    tokenizer: Any, template: str, messages: list[dict[str, Any]], answer_ws: str = ""
) -> tuple[str, bool]:
    """A chat as text, and whether encoding it adds the tokenizer's special tokens (`plain`
    does; a chat template writes its own BOS)."""
    template = effective_template(tokenizer, template)
    if template == "plain":
        return plain_text(messages, answer_ws), True
    kwargs: dict[str, Any] = {} if template == "tokenizer" else {"chat_template": template}
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kwargs
    )
    return text, False


def trailing_whitespace(text: str) -> str:
    return _TRAILING_WS.search(text).group()  # type: ignore[union-attr]


def answer_whitespace(entries: Iterable[tuple[Any, str]]) -> str:
    """The whitespace `plain` ends with: that of the first entry (tokenizer, template) that
    renders with a chat template (pass the experts first), "" if none does (every model
    `plain`, as `User: …\\nAssistant:` always ended)."""
    for tokenizer, template in entries:
        if effective_template(tokenizer, template) != "plain":
            try:
                return trailing_whitespace(render_text(tokenizer, template, PROBE)[0])
            except Exception as exc:  # noqa: BLE001 - a template that refuses a one-turn chat
                log.warning("cannot render a probe chat with a model's template: %s", exc)
    return ""


def token_text(tokenizer: Any, token_id: int) -> str:
    """A token's text with its leading whitespace (SentencePiece tokenizers drop a leading
    space when a token is decoded alone, so decode it after an anchor and cut the anchor)."""
    anchor = tokenizer.encode("a", add_special_tokens=False)[-1:]
    both = tokenizer.decode(anchor + [token_id])
    return both[len(tokenizer.decode(anchor)) :]


def leading_whitespace(text: str) -> str:
    return text[: len(text) - len(text.lstrip())]


@dataclass
class Start:
    """How one model starts the probe's answer."""

    model: str
    token_id: int | None  # None: the rendering's last token merges with the answer's first
    text: str  # the token's text ("" when unknown)
    ending: str | None = None  # the rendering's trailing whitespace (textual verdicts)

    def describe(self) -> str:
        ends = "" if self.ending is None else f" ends {self.ending!r},"
        if self.token_id is None:
            return f"{self.model}{ends} merges with the answer's first word"
        then = " then" if ends else ""
        return f"{self.model}{ends}{then} {self.text!r} (id {self.token_id})"


@dataclass
class Verdict:
    aligned: bool
    starts: list[Start]
    what: str  # what was compared

    def line(self) -> str:
        starts = ", ".join(s.describe() for s in self.starts)
        if self.aligned:
            return f"answer boundary aligned ({self.what}): {starts}"
        return f"answer boundary differs between models ({self.what}): {starts}; {ADVICE}"


def textual_verdict(entries: dict[str, tuple[Any, str]], answer_ws: str) -> Verdict:
    """Without weights: each entry's (tokenizer, template) rendering of the probe must end in the
    same whitespace, and the bare word `ANSWER_WORD` after it must be one same token."""
    starts = []
    for name, (tokenizer, template) in entries.items():
        text, special = render_text(tokenizer, template, PROBE, answer_ws)
        prompt = tokenizer.encode(text, add_special_tokens=special)
        full = tokenizer.encode(text + ANSWER_WORD, add_special_tokens=special)
        merged = full[: len(prompt)] != prompt or len(full) == len(prompt)
        tid = None if merged else full[len(prompt)]
        starts.append(
            Start(name, tid, "" if tid is None else token_text(tokenizer, tid),
                  trailing_whitespace(text))
        )  # fmt: skip
    aligned = (
        len({s.ending for s in starts}) <= 1
        and None not in {s.token_id for s in starts}
        and len({s.token_id for s in starts}) <= 1
    )
    return Verdict(aligned, starts, "renderings' endings, no weights")


def weights_verdict(
    prompts: dict[str, list[int]],
    tokenizers: dict[str, Any],
    last_logits: Callable[[str, list[int]], torch.Tensor],
    vocab_size: int,
) -> Verdict:
    """With weights: the first answer token each model prefers after its own rendering of the
    probe (`prompts`); the models must agree on its leading whitespace."""
    starts = []
    for name, ids in prompts.items():
        tid = int(last_logits(name, ids)[:vocab_size].argmax())
        starts.append(Start(name, tid, token_text(tokenizers[name], tid)))
    aligned = len({leading_whitespace(s.text) for s in starts}) <= 1
    return Verdict(aligned, starts, "first answer token each model prefers")


def check_family(
    family: Any, last_logits: Callable[[str, list[int]], torch.Tensor]
) -> Verdict | None:
    """`weights_verdict` over the composed models (base, reference, experts) of a family
    with experts, logged: one warning line when they disagree (None: the probe failed, e.g. a
    template that refuses a one-turn chat; requests will say so themselves)."""
    from .family import render_chat  # family.py renders with this module's helpers

    cfg = family.config
    names = [cfg.base, *([cfg.reference] if cfg.reference else []), *cfg.experts]
    try:
        ws = family.answer_whitespace
        prompts = {n: render_chat(family.models[n], PROBE, ws) for n in names}
        tokenizers = {n: family.models[n].tokenizer for n in names}
        verdict = weights_verdict(prompts, tokenizers, last_logits, family.vocab_size)
    except Exception as exc:  # noqa: BLE001 - advice only: it never stops the server
        log.warning("family %s: the answer-boundary probe failed: %s", family.name, exc)
        return None
    if verdict.aligned:
        log.info("family %s: %s", family.name, verdict.line())
    else:
        log.warning("family %s: %s", family.name, verdict.line())
    return verdict
