"""Synthetic prompts of a target token length and the per-request EFT knobs.

Like vLLM's `random` dataset, prompts are random text: the content does not matter for
throughput, only the length. The client has no tokenizer, so it asks the server's `/tokenize`
once how many tokens a sample of words costs and scales the word count to the target.
"""

from __future__ import annotations

import math
import random

import httpx

WORDS = (
    "the a of and to in is was for on with as by at from that this it be are or an which "
    "river city north south king queen year founded capital export grain salt copper wool "
    "question answer help safe please thanks sorry cannot tell you me how what who when where "
    "model token server batch cache latency request stream water mountain people history"
).split()


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n_words)))


async def tokens_per_word(
    client: httpx.AsyncClient, url: str, model: str, rng: random.Random
) -> float:
    """Tokens per word of `random_text` under the server's tokenizer (1.5 if it cannot say)."""
    sample = random_text(rng, 200)
    try:
        resp = await client.post(f"{url}/tokenize", json={"model": model, "prompt": sample})
        if resp.status_code == 200:
            data = resp.json()
            count = data.get("count") or len(data.get("tokens") or [])
            if count:
                return count / 200
    except (httpx.HTTPError, ValueError):
        pass
    return 1.5


def make_prompts(n: int, prompt_len: int, tok_per_word: float, seed: int) -> list[str]:
    """`n` distinct random prompts of about `prompt_len` tokens each."""
    rng = random.Random(seed)
    n_words = max(1, round(prompt_len / max(tok_per_word, 1e-3)))
    return [random_text(rng, n_words) for _ in range(n)]


def mixed_workload(
    n: int,
    seed: int,
    words: tuple[int, int] = (4, 60),
    tokens: tuple[int, int] = (8, 128),
) -> list[tuple[str, int]]:
    """`n` requests as (prompt, max_tokens): prompts of `words` words (uniform), outputs of
    `tokens` tokens, log-uniform, so short answers are common and long ones rare, as in chat
    traffic. A static batch runs until its longest row is done, so the spread is what
    continuous batching recovers."""
    rng = random.Random(seed)
    lo, hi = math.log(tokens[0]), math.log(tokens[1])
    return [
        (random_text(rng, rng.randint(*words)), round(math.exp(rng.uniform(lo, hi))))
        for _ in range(n)
    ]


def make_knobs(
    n: int, mode: str, seed: int, fixed: dict[str, float] | None
) -> list[dict[str, float] | None]:
    """Per-request `eft` bodies.

    fixed: the same knobs for every request (`fixed`, or None to use the family's defaults).
    mixed: the paper's test-time interpolation, w_helpful = λ, w_harmless = 1 - λ, λ ~ U(0, 1)
    per request; so every batch mixes rows with different coefficient vectors.
    """
    if mode == "fixed":
        return [dict(fixed) if fixed else None for _ in range(n)]
    if mode != "mixed":
        raise ValueError(f"knobs must be fixed or mixed, not {mode!r}")
    rng = random.Random(seed + 1)
    out: list[dict[str, float] | None] = []
    for _ in range(n):
        lam = round(rng.random(), 3)
        out.append({"helpful": lam, "harmless": round(1.0 - lam, 3)})
    return out
