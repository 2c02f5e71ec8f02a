"""Means with 95% intervals, over prompts.

Each prompt contributes one value: its score, or the mean of its K samples' scores. The interval
is over prompts, because K samples of one prompt are not independent evidence:
- greedy (one sample) 0/1 scores: the Wilson score interval, which stays inside [0, 1] and is
  sensible at 0% and 100%;
- anything else: Student's t interval on the per-prompt values (clipped to [0, 1] when every
  value lies there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054
# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t95(df: int) -> float:
    if df < 1:
        return math.inf
    if df <= len(_T95):
        return _T95[df - 1]
    return Z95 + (Z95**3 + Z95) / (4 * df)  # Cornish-Fisher: within 0.003 of the table at 30


def wilson(successes: float, n: int) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(per_prompt: Sequence[Sequence[float]]) -> dict[str, float | int | None]:
    """`per_prompt[i]` = the scores of prompt i's samples (empty: the scorer did not apply).

    Returns mean, lo, hi (None where undefined: no prompt, or one non-binary value) and n.
    """
    samples = [s for s in per_prompt if s]
    n = len(samples)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    values = [sum(s) / len(s) for s in samples]
    mean = sum(values) / n
    unit = all(0.0 <= v <= 1.0 for v in values)
    binary = all(len(s) == 1 and s[0] in (0.0, 1.0) for s in samples)
    if binary:
        lo, hi = wilson(sum(values), n)
    elif n == 1:
        lo, hi = math.nan, math.nan
    else:
        var = sum((v - mean) ** 2 for v in values) / (n - 1)
        half = t95(n - 1) * math.sqrt(var / n)
        lo, hi = mean - half, mean + half
        if unit:
            lo, hi = max(0.0, lo), min(1.0, hi)
    return {"mean": _r(mean), "lo": _r(lo), "hi": _r(hi), "n": n}


def _r(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 6)
