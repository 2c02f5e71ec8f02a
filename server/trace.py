"""The per-token trace (`"eft": {"trace": true}`): each model's view of every token.

The engine reports, per token, the composed log-prob and each model's own log-prob and most
likely token (`TokenTrace`); this module turns that into the wire format by role: the base,
the reference, each expert the request used with its implicit reward
`r_e = lp_e - lp_reference` (what fine-tuning added to that token), and whether the
composition changed the token relative to the base alone and to the strongest expert alone.
"""

from __future__ import annotations

from typing import Any

from decoding.request import Composition, TokenTrace
from server import protocol as P
from server.tokens import TokenText


class TraceFormatter:
    """Trace entries for one request's composition."""

    def __init__(self, family: Any, comp: Composition, ttext: TokenText):
        cfg = family.config
        self.ttext = ttext
        self.base = cfg.base if cfg.base in comp.coeffs else None
        self.reference = cfg.reference if cfg.reference in comp.coeffs else None
        self.experts = [e for e in cfg.experts if e in comp.coeffs]
        # The strongest expert: the heaviest weight (the first named on a tie).
        self.strongest = max(self.experts, key=lambda e: comp.coeffs[e], default=None)

    def entry(self, t: TokenTrace | None) -> P.TraceToken | None:
        if t is None:
            return None
        ref = t.models.get(self.reference) if self.reference else None
        experts = {e: t.models[e] for e in self.experts if e in t.models}
        return P.TraceToken(
            token_id=t.token_id,
            token=self.ttext.text(t.token_id),
            logprob=t.logprob,
            base=t.models.get(self.base) if self.base else None,
            reference=ref,
            experts=experts,
            rewards={e: lp - ref for e, lp in experts.items()} if ref is not None else {},
            changed_vs_base=t.token_id != t.argmax[self.base] if self.base else None,
            changed_vs_expert=(t.token_id != t.argmax[self.strongest] if self.strongest else None),
        )

    def entries(self, traces: list[TokenTrace | None] | None) -> list[P.TraceToken | None] | None:
        if traces is None:
            return None
        return [self.entry(t) for t in traces]
