"""Incremental detokenization and stop strings, per sequence.

Byte-level BPE splits multi-byte characters across tokens, so decoding the newest token alone
yields U+FFFD. We decode a short window (`prefix_offset`..end) and only emit text once it no
longer ends in an incomplete character (the TGI/vLLM offsets scheme). Text that could be the
beginning of a stop string is held back until it is known not to be one, so a stop string that
spans tokens is cut cleanly and never streamed.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stop: list[str] | None = None,
        skip_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # all decoded text so far (stop text excluded once found)
        self.emitted = 0  # characters of `text` already returned to the caller
        self.check_from = 0  # stop strings match only text from here on (after `min_tokens`)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add(self, token_id: int, check_stop: bool = True) -> tuple[str, str | None]:
        """Append a token; return (text safe to emit now, the stop string if one was hit).

        With `check_stop` False (before `min_tokens`) stop strings are neither looked for nor
        held back.
        """
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        if not check_stop:
            self.check_from = len(self.text)  # generated before `min_tokens`: never a stop
        elif self.stop:
            # Only the new tail, plus each stop string's own reach back into text held back or
            # just emitted, can hold a new match; never text from before `min_tokens`.
            hits = [
                (self.text.find(s, max(self.check_from, self.emitted - len(s) + 1)), s)
                for s in self.stop
            ]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                index, stop = min(hits)
                self.text = self.text[:index]
                return self._take(len(self.text)), stop
            return self._take(len(self.text) - self._partial_stop()), None
        return self._take(len(self.text)), None

    def flush(self) -> str:
        """Whatever is still held back, when the sequence ends for another reason."""
        return self._take(len(self.text))

    def _partial_stop(self) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out
