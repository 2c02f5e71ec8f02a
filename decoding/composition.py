"""Knobs -> coefficient vector, and the weighted log-prob sum that is EFT (docs/math.md).

A composition is a coefficient per model: `log p~ = sum_m c_m * lp_m` with c_base = 1,
c_expert = w_expert and c_reference = -sum(w). Serving one model alone is the composition
{model: 1}. Rows with different compositions share one forward pass per model; only the
weighted sum below differs per row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .family import FILTER_KEYS, Family
from .request import Composition, RequestValidationError

# Log-probs are clamped from below before they are weighted: a token the small reference rules
# out (-inf) would otherwise become +inf after `- lp_reference`, and 0 * -inf is NaN.
LP_FLOOR = -1e4
ALIASES = {"helpfulness": "helpful", "harmlessness": "harmless"}


def make_composition(
    family: Family,
    model: str | None = None,
    knobs: Mapping[str, Any] | None = None,
    allow_negative: bool = False,
) -> Composition:
    """Validate a request's knobs and turn them into a `Composition`.

    `model=None` is the family's EFT composition; a model name serves that model alone (knobs
    are then refused). A family without experts (one model alone) composes to its base.
    Expert weights default to the family's `defaults` only when the request
    names no expert; named ones make the others 0. Raises `RequestValidationError` (param set).
    """
    cfg = family.config
    knobs = dict(knobs or {})
    if model is not None:
        if model not in family.models:
            raise RequestValidationError(f"unknown model {model!r}", param="model")
        if knobs:
            raise RequestValidationError(
                f"EFT knobs apply to the composition '{cfg.name}', not to the single model "
                f"'{cfg.name}/{model}'",
                param="eft",
            )
        return Composition(coeffs={model: 1.0})

    weights: dict[str, float] = {}
    filters: dict[str, float] = {}
    for key, value in knobs.items():
        name = ALIASES[key] if key in ALIASES and ALIASES[key] in cfg.experts else key
        param = f"eft.{key}"
        if name not in cfg.experts and name not in FILTER_KEYS:
            raise RequestValidationError(
                f"unknown EFT knob {key!r}: the experts of '{cfg.name}' are "
                f"{', '.join(cfg.experts) or '(none)'}; filters are {', '.join(FILTER_KEYS)}",
                param=param,
            )
        if name in weights or name in filters:
            raise RequestValidationError(f"EFT knob {name!r} is given twice", param=param)
        number = _finite_number(value, param)
        if name in FILTER_KEYS:
            filters[name] = _check_filter(name, number, param)
            continue
        if number < 0 and not allow_negative:
            raise RequestValidationError(
                f"{param} must be >= 0 (negative weights invert a fine-tuning and are disabled "
                "on this server)",
                param=param,
            )
        if abs(number) > cfg.max_weight:
            raise RequestValidationError(
                f"{param} must be at most {cfg.max_weight:g} in magnitude", param=param
            )
        weights[name] = number

    if not weights:
        weights = {e: float(cfg.defaults.get(e, 0.0)) for e in cfg.experts}
    weights = {e: weights.get(e, 0.0) for e in cfg.experts}
    for key in FILTER_KEYS:
        if key not in filters and key in cfg.defaults:
            filters[key] = float(cfg.defaults[key])

    coeffs = {cfg.base: 1.0}
    for expert, w in weights.items():
        if w != 0.0:
            coeffs[expert] = w
    total = sum(weights.values())
    if total != 0.0:
        coeffs[cfg.reference] = -total
    base_top_p = filters.get("base_top_p")
    plausibility = filters.get("plausibility")
    return Composition(
        coeffs=coeffs,
        base_top_p=base_top_p if base_top_p is not None and base_top_p < 1.0 else None,
        plausibility=plausibility or None,
        knobs={**weights, **filters},
        base=cfg.base,
        experts=tuple(e for e, w in weights.items() if w != 0.0),
    )


def _finite_number(value: Any, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestValidationError(f"{param} must be a number", param=param)
    if not math.isfinite(value):
        raise RequestValidationError(f"{param} must be finite", param=param)
    return float(value)


def _check_filter(name: str, value: float, param: str) -> float:
    if name == "base_top_p" and not 0.0 < value <= 1.0:
        raise RequestValidationError(f"{param} must be in (0, 1]", param=param)
    if name == "plausibility" and not 0.0 <= value < 1.0:
        raise RequestValidationError(f"{param} must be in [0, 1)", param=param)
    return value


def log_probs(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """fp32 log-softmax over the shared vocabulary, clamped from below (see LP_FLOOR)."""
    return torch.log_softmax(logits[..., :vocab_size].float(), dim=-1).clamp_min_(LP_FLOOR)


def combine(
    batch_size: int,
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """The EFT sum: `scores[r] = sum_m coef_m[r] * lp_m[r]`, renormalised.

    `parts` holds, per model that ran, (row indices [b_m], coefficients [b_m], log-probs [b_m, V]):
    each model only ran for the rows that use it. The result is the composed, normalised
    log-probability [B, V] in float32.
    """
    idx0, _, lp0 = parts[0]
    scores = torch.zeros(batch_size, lp0.shape[-1], dtype=torch.float32, device=lp0.device)
    for idx, coef, lp in parts:
        scores.index_add_(0, idx, lp * coef.unsqueeze(-1))
    return torch.log_softmax(scores, dim=-1)


def nucleus_mask(lp: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """True for tokens outside each row's top-p nucleus of the distribution `lp` [b, V]."""
    sorted_lp, order = lp.sort(dim=-1, descending=True)
    cum = sorted_lp.exp().cumsum(-1)
    # A token is outside if the mass before it already reaches top_p (the top token never is).
    outside_sorted = (cum - sorted_lp.exp()) >= top_p.unsqueeze(-1)
    return torch.zeros_like(outside_sorted).scatter_(-1, order, outside_sorted)


def plausibility_mask(
    base_lp: torch.Tensor, mix_lp: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """True for tokens below alpha x the top token's probability under both distributions.

    Contrastive decoding's plausibility constraint: dividing by the small reference amplifies
    tokens it finds surprising; a token survives only if the base or the expert mixture finds
    it plausible on its own.
    """
    log_alpha = alpha.clamp_min(1e-30).log().unsqueeze(-1)
    low_base = base_lp < base_lp.max(-1, keepdim=True).values + log_alpha
    low_mix = mix_lp < mix_lp.max(-1, keepdim=True).values + log_alpha
    return low_base & low_mix


@dataclass
class BatchFilters:
    """The conservative-decoding filters of a batch's rows, as tensors (rebuilt with the batch).

    `base_top_p` keeps each row inside the base model's nucleus; `plausibility` keeps tokens
    that the base or the row's normalised expert mixture finds plausible on its own.
    """

    base: str  # the family's base model: whose nucleus the filters use
    top_p_rows: torch.Tensor  # [r] rows with base_top_p
    top_p: torch.Tensor  # [r]
    plaus_rows: torch.Tensor  # [q] rows with plausibility
    alpha: torch.Tensor  # [q]
    mix: dict[str, torch.Tensor]  # expert -> [q] its weight in each row's normalised mixture

    @classmethod
    def build(cls, comps: list[Composition], device: torch.device) -> BatchFilters | None:
        top_p_rows = [i for i, c in enumerate(comps) if c.base_top_p is not None]
        plaus_rows = [i for i, c in enumerate(comps) if c.plausibility]
        if not (top_p_rows or plaus_rows):
            return None
        mix: dict[str, list[float]] = {}
        for j, i in enumerate(plaus_rows):
            c = comps[i]
            total = sum(c.coeffs[e] for e in c.experts)
            for e in c.experts:
                mix.setdefault(e, [0.0] * len(plaus_rows))[j] = (
                    c.coeffs[e] / total if total else 0.0
                )
        t = lambda values: torch.tensor(values, device=device)  # noqa: E731
        return cls(
            base=comps[(top_p_rows or plaus_rows)[0]].base,
            top_p_rows=t(top_p_rows),
            top_p=t([comps[i].base_top_p for i in top_p_rows]),
            plaus_rows=t(plaus_rows),
            alpha=t([comps[i].plausibility for i in plaus_rows]),
            mix={e: t(w) for e, w in mix.items()},
        )

    def mask(
        self,
        batch: int,
        vocab: int,
        parts: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]],
        banned: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """True for the tokens each row may not sample. `parts`: (model, rows, coef, lp).

        `banned` ([batch, vocab], True = may not be sampled now, e.g. EOS under `min_tokens`)
        is taken out of the base and expert distributions first, so the filters choose among
        tokens that can be sampled and never leave a row empty.
        """
        device = self.top_p.device
        base_full = torch.zeros(batch, vocab, device=device)
        expert_full: dict[str, torch.Tensor] = {}
        for name, idx, _, lp in parts:
            if name == self.base:
                base_full.index_copy_(0, idx, lp)
            elif name in self.mix:
                expert_full.setdefault(name, torch.zeros(batch, vocab, device=device))
                expert_full[name].index_copy_(0, idx, lp)
        if banned is not None:
            base_full = torch.log_softmax(base_full.masked_fill(banned, -torch.inf), dim=-1)
            for name, lp in expert_full.items():
                expert_full[name] = torch.log_softmax(lp.masked_fill(banned, -torch.inf), dim=-1)
        mask = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
        if len(self.top_p_rows):
            rows = self.top_p_rows
            mask[rows] |= nucleus_mask(base_full[rows], self.top_p)
        if len(self.plaus_rows):
            rows = self.plaus_rows
            base = base_full[rows]
            mix = base
            if self.mix:
                # A zero weight contributes nothing, also where a ban made the log-prob -inf
                # (0 x -inf would be NaN and switch the row's filter off).
                mixed = sum(
                    torch.where(w.unsqueeze(-1) > 0, w.unsqueeze(-1) * expert_full[e][rows], 0.0)
                    for e, w in self.mix.items()
                )
                # Rows whose experts all weigh 0 fall back to the base alone.
                empty = sum(self.mix.values()) == 0
                mix = torch.where(empty.unsqueeze(-1), base, torch.log_softmax(mixed, dim=-1))
            mask[rows] |= plausibility_mask(base, mix, self.alpha)
        return mask
