"""Incremental detokenization and stop strings, token by token."""

from __future__ import annotations

import pytest

from decoding.detokenizer import IncrementalDetokenizer

TEXT = "café 東京 😀 naïve über the river"


def feed(tokenizer, ids, stop=None):
    detok = IncrementalDetokenizer(tokenizer, stop)
    pieces, hit = [], None
    for tok in ids:
        piece, hit = detok.add(tok)
        pieces.append(piece)
        if hit:
            break
    else:
        pieces.append(detok.flush())
    return pieces, hit


def test_multibyte_characters_split_across_tokens_are_emitted_whole(tiny_family):
    tok = tiny_family.tokenizer
    ids = tok.encode(TEXT, add_special_tokens=False)
    # The byte-level BPE really does split some of these characters across tokens.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    pieces, _ = feed(tok, ids)
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("stop", ["東京", "ï", "river", "e r"])
def test_stop_string_is_cut_and_never_streamed(tiny_family, stop):
    tok = tiny_family.tokenizer
    pieces, hit = feed(tok, tok.encode(TEXT, add_special_tokens=False), [stop])
    assert hit == stop
    assert "".join(pieces) == TEXT[: TEXT.find(stop)]


def test_text_that_only_looks_like_a_stop_prefix_is_released(tiny_family):
    tok = tiny_family.tokenizer
    pieces, hit = feed(tok, tok.encode(TEXT, add_special_tokens=False), ["café!", "rivers"])
    assert hit is None
    assert "".join(pieces) == TEXT


def test_stop_strings_ignore_text_from_before_min_tokens(tiny_family):
    """A "." generated before `min_tokens` is no stop, whatever the other stop strings' reach
    (a 200-character stop string once made the search look back over it); the next "." after
    `min_tokens` is."""
    tok = tiny_family.tokenizer
    text = "salt. copper and river. city"
    ids = tok.encode(text, add_special_tokens=False)
    first = next(i for i in range(1, len(ids) + 1) if "." in tok.decode(ids[:i]))
    detok = IncrementalDetokenizer(tok, [".", "z" * 200])
    out, hit = "", None
    for n, t in enumerate(ids, start=1):
        piece, hit = detok.add(t, check_stop=n > first)  # min_tokens just past the first "."
        out += piece
        if hit:
            break
    assert hit == "."
    assert out == text[: text.index(".", text.index(".") + 1)]
