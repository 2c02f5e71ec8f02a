"""Token id -> (display string, raw bytes), for logprobs.

A single byte-level BPE token can be half of a UTF-8 character, so `decode([id])` gives U+FFFD.
OpenAI reports such a token's exact `bytes`; we recover them from the byte-level alphabet
(GPT-2's printable mapping) or SentencePiece's `<0xNN>` pieces, and show the string as
`bytes:\\xNN...` (vLLM's convention) when the bytes are not valid UTF-8 on their own.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    # GPT-2's bytes_to_unicode, inverted: printable bytes map to themselves, the rest to 256+.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class TokenText:
    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.byte_level = "ByteLevel" in repr(getattr(backend, "decoder", None))
        self._cache: dict[int, tuple[str, bytes]] = {}

    def get(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._compute(token_id)
        return hit

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]

    def bytes(self, token_id: int) -> list[int]:
        return list(self.get(token_id)[1])

    def _compute(self, token_id: int) -> tuple[str, bytes]:
        piece = self.tok.convert_ids_to_tokens(token_id)
        raw: bytes | None = None
        if isinstance(piece, str):
            dec = _byte_decoder()
            if self.byte_level and piece and all(c in dec for c in piece):
                raw = bytes(dec[c] for c in piece)
            elif m := _SP_BYTE.match(piece):
                raw = bytes([int(m.group(1), 16)])
            elif "▁" in piece:
                raw = piece.replace("▁", " ").encode()
        if raw is None:
            raw = self.tok.decode([token_id]).encode()
        try:
            return raw.decode("utf-8"), raw
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw
