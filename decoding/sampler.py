"""From each model's log-probs to one token per row: combine, penalise, ban, filter, sample.

One step, for a batch whose rows each have their own composition and sampling parameters
(TGI's "heterogeneous" chooser; the per-row tensors are rebuilt only when the batch's
membership changes, in `Sampler.prepare`):

1. **combine**: `log p~ = log_softmax(sum_m c_m lp_m)` in float32; this is what `logprobs` report.
   A row that is not finite here (a model emitted NaN/inf) fails alone.
2. **penalties** (vLLM's set): repetition on the composed scores centred like logits (see
   `apply_penalties`), then frequency and presence on the output counts.
3. **grammar** (structured outputs): a row with a format loses every token its grammar rules
   out next (`decoding.grammar`); every later step chooses among what is left.
   **bans**: while a row has fewer than `min_tokens` tokens, EOS and its stop token ids are
   removed; a ban never removes a row's last allowed token.
4. **temperature**, then **top-k**, **top-p** and **min-p**; a temperature below
   `GREEDY_BELOW` is greedy (dividing by it would overflow).
5. **conservative filters** (`base_top_p`, `plausibility`), computed on the base and expert
   distributions with the same bans applied, so a filter and a ban can never disagree on
   every token.
6. **draw**: the exponential race `argmax p / E`, E ~ Exp(1), which samples exactly from p and
   lets a seeded row draw from its own generator (reproducible whatever shares its batch).

No row can end with every token masked: each filter keeps at least its top token, and a row
that still ends empty falls back to its scores before the filters.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .composition import BatchFilters, combine, log_probs
from .grammar import GrammarMask, Grammars
from .request import SamplingParams, TokenLogprob, TokenTrace
from .sequence import Sequence

GREEDY_BELOW = 1e-5  # temperatures below this are greedy (vLLM's threshold)

# One model's contribution to a step: (model, batch rows [b_m], coefficients [b_m], lp [b_m, V]).
Part = tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class StepSample:
    tokens: list[int]  # -1 for a row whose composed distribution is not finite
    on_device: torch.Tensor  # the same tokens (clamped to >= 0), for the next decode step
    logprobs: list[TokenLogprob | None]  # per row, when its request asked for them
    traces: list[TokenTrace | None]  # per row, when its request asked for a trace
    combine_seconds: float = 0.0


class BatchParams:
    """The per-row sampling tensors of one batch membership."""

    def __init__(
        self,
        rows: list[Sequence],
        vocab: int,
        device: torch.device,
        grammars: Grammars | None = None,
    ):
        params = [s.params for s in rows]

        def t(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        self.greedy_rows = [p.temperature < GREEDY_BELOW for p in params]
        sampled = [p for p, g in zip(params, self.greedy_rows) if not g]
        self.all_greedy = not sampled
        self.greedy = t(self.greedy_rows, torch.bool)
        self.temperature = t(
            [1.0 if g else p.temperature for p, g in zip(params, self.greedy_rows)]
        )
        self.top_k = t([p.top_k if 0 < p.top_k < vocab else vocab for p in params], torch.long)
        self.top_p = t([p.top_p for p in params])
        self.min_p = t([p.min_p for p in params])
        self.any_top_k = any(0 < p.top_k < vocab for p in sampled)
        self.any_top_p = any(p.top_p < 1.0 for p in sampled)
        self.any_min_p = any(p.min_p > 0.0 for p in sampled)
        self.generators = [s.generator for s in rows]
        self.max_logprobs = max((p.logprobs for p in params if p.logprobs is not None), default=-1)
        self.trace_rows = [i for i, p in enumerate(params) if p.trace]
        self.filters = BatchFilters.build([s.request.req.composition for s in rows], device)
        self.penalties = Penalties.build(rows, vocab, device)
        self.device = device
        # Rows with a format: the one per-step cost of structured outputs, and none at all
        # for a batch without any.
        self.grammar: GrammarMask | None = None
        if grammars is not None and any(s.matcher is not None for s in rows):
            self.grammar = GrammarMask(grammars, [s.matcher for s in rows], device)


class Penalties:
    """Repetition/frequency/presence state of the rows that use any, updated in place per step."""

    def __init__(self, rows: list[int], rep, freq, pres, seen, counts):
        self.rows = rows
        self.index = torch.tensor(rows, device=rep.device)
        self.repetition, self.frequency, self.presence = rep, freq, pres
        self.seen = seen  # [P, V] bool: in the prompt (any model's rendering) or the output
        self.counts = counts  # [P, V] float: occurrences in the output

    @classmethod
    def build(cls, rows: list[Sequence], vocab: int, device: torch.device) -> Penalties | None:
        idx = [i for i, s in enumerate(rows) if s.params.has_penalties]
        if not idx:
            return None
        seen = torch.zeros(len(idx), vocab, dtype=torch.bool, device=device)
        counts = torch.zeros(len(idx), vocab, device=device)
        for j, i in enumerate(idx):
            seq = rows[i]
            prompt = sorted({t for ids in seq.request.req.prompt_ids.values() for t in ids})
            seen[j, torch.tensor(prompt, dtype=torch.long, device=device)] = True
            if seq.output:
                out = torch.tensor(seq.output, device=device)
                counts[j].index_add_(0, out, torch.ones(len(seq.output), device=device))
        p = [rows[i].params for i in idx]

        def t(values):
            return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(-1)

        return cls(
            idx,
            t([x.repetition_penalty for x in p]),
            t([x.frequency_penalty for x in p]),
            t([x.presence_penalty for x in p]),
            seen | (counts > 0),
            counts,
        )

    def apply(self, scores: torch.Tensor) -> torch.Tensor:
        sub = apply_penalties(
            scores.index_select(0, self.index), self.seen, self.counts,
            self.repetition, self.frequency, self.presence,
        )  # fmt: skip
        return scores.index_copy(0, self.index, sub)

    def record(self, tokens: torch.Tensor) -> None:
        """Count this step's tokens (device tensor, one per batch row)."""
        chosen = tokens.index_select(0, self.index).unsqueeze(-1)
        self.counts.scatter_add_(1, chosen, torch.ones_like(chosen, dtype=self.counts.dtype))
        self.seen.scatter_(1, chosen, True)


def apply_penalties(
    scores: torch.Tensor,
    seen: torch.Tensor,
    counts: torch.Tensor,
    repetition: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
) -> torch.Tensor:
    """vLLM's three penalties, on composed log-probs [P, V].

    Repetition (HF/vLLM divide positive logits and multiply negative ones by θ) needs a zero
    point, which log-probs (all <= 0) lack: we centre each row at its median,
    `s = log p~ - median(log p~)`, so tokens more likely than the typical token are positive as
    a model's logits are, then `s / θ` for a seen token with `s > 0` and `s * θ` otherwise.
    With θ = 2 a confident repeat (far above the median) loses half its margin and yields to
    the runner-up. Frequency and presence subtract `f * count` and `p * (count > 0)`; both are
    shift-invariant so need no centring.
    """
    centred = scores - scores.median(dim=-1, keepdim=True).values
    penalised = torch.where(centred > 0, centred / repetition, centred * repetition)
    out = torch.where(seen, penalised, centred)
    out = out - frequency * counts - presence * (counts > 0).float()
    # A tiny θ would send a score to inf (and softmax to NaN): keep scores finite.
    return out.clamp(-1e30, 1e30)


def top_k_top_p_min_p(logits: torch.Tensor, bp: BatchParams) -> torch.Tensor:
    """Mask (-inf) what each row's top-k, then top-p, then min-p drop (each keeps its top)."""
    if bp.any_top_k or bp.any_top_p:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if bp.any_top_k:
            ranks = torch.arange(logits.shape[-1], device=logits.device)
            drop |= ranks.unsqueeze(0) >= bp.top_k.unsqueeze(-1)
        if bp.any_top_p:
            probs = torch.softmax(sorted_logits.masked_fill(drop, -torch.inf), dim=-1)
            # Drop a token once the mass strictly before it already reaches top_p.
            drop |= (probs.cumsum(-1) - probs) >= bp.top_p.unsqueeze(-1)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), -torch.inf)
    if bp.any_min_p:
        probs = torch.softmax(logits, dim=-1)
        low = probs < bp.min_p.unsqueeze(-1) * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(low, -torch.inf)
    return logits


class Sampler:
    def __init__(
        self,
        vocab_size: int,
        device: torch.device,
        eos_ids: frozenset[int],
        seed: int,
        grammars: Grammars | None = None,
    ):
        self.vocab = vocab_size
        self.grammars = grammars
        self.device = device
        self.eos_ids = eos_ids
        self.shared = torch.Generator(device=device).manual_seed(seed)
        self.params: BatchParams | None = None
        self._rows: list[Sequence] = []
        self._expanded: dict[tuple[int, ...], BatchParams] = {}

    def prepare(self, rows: list[Sequence]) -> None:
        """Per-row tensors for a new batch membership (rows joined or left)."""
        self.params = BatchParams(rows, self.vocab, self.device, self.grammars)
        self._rows = rows
        self._expanded.clear()

    def expanded(self, index: list[int]) -> BatchParams:
        """The per-row tensors of a batch whose rows are the prepared rows `index` (repeats
        allowed): a speculative block scores every position of every row at once. Cached
        for the membership (a row's block lengths repeat from step to step)."""
        key = tuple(index)
        bp = self._expanded.get(key)
        if bp is None:
            if len(self._expanded) >= 256:
                self._expanded.clear()
            bp = BatchParams([self._rows[i] for i in index], self.vocab, self.device)
            self._expanded[key] = bp
        return bp

    def sample(self, rows: list[Sequence], parts: list[Part]) -> StepSample:
        bp = self.params
        # The grammar masks are computed on the host while the device runs the step's forwards.
        disallowed = bp.grammar.disallowed() if bp.grammar is not None else None
        t0 = time.perf_counter()
        composed = combine(len(rows), [(i, c, lp) for _, i, c, lp in parts])
        combine_seconds = time.perf_counter() - t0
        logits, finite = self.target_logits(rows, parts, composed, disallowed=disallowed)
        tokens = self._draw(logits, bp)
        tokens = torch.where(finite, tokens, torch.full_like(tokens, -1))
        on_device = tokens.clamp_min(0)
        if bp.penalties is not None:
            bp.penalties.record(on_device)
        token_list = tokens.tolist()  # the step's one device -> host sync
        reported = composed
        if disallowed is not None and (bp.max_logprobs >= 0 or bp.trace_rows):
            reported = bp.grammar.renormalised(composed, disallowed, bp.grammar.constrained)
        return StepSample(
            token_list,
            on_device,
            self._logprobs(rows, reported, on_device, token_list, bp),
            self._traces(rows, parts, reported, on_device, token_list, bp),
            combine_seconds,
        )

    def target_logits(
        self,
        rows: list[Sequence],
        parts: list[Part],
        composed: torch.Tensor,
        ahead: int | list[int] = 0,
        bp: BatchParams | None = None,
        disallowed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The distribution each row samples from, as logits (-inf where ruled out), and
        whether its composed distribution is finite. `ahead`: tokens the rows are assumed to
        have beyond their output (a speculative block's position; one per row or for all),
        for `min_tokens`; `bp`: the rows' tensors when they are not the prepared batch;
        `disallowed`: [B, V] True for tokens the rows' grammars rule out."""
        bp = bp or self.params
        # A row's sum is finite exactly when all its entries are (one reduction, no [B, V]
        # temporary). A non-finite row is failed by the caller; rows never mix, so its NaNs
        # need no cleaning here.
        finite = torch.isfinite(composed.sum(dim=-1))
        scores = composed
        if bp.penalties is not None:
            scores = bp.penalties.apply(scores)
        if disallowed is not None:
            # After the penalties (they centre on the median over the whole vocabulary),
            # before the bans (a ban keeps a row's last token *the grammar allows*).
            scores = scores.masked_fill(disallowed, -torch.inf)
        banned = self._bans(rows, scores, ahead)
        if banned is not None:
            scores = scores.masked_fill(banned, -torch.inf)
        logits = scores
        if not bp.all_greedy:
            logits = top_k_top_p_min_p(scores / bp.temperature.unsqueeze(-1), bp)
        if bp.filters is None:
            # Bans keep a row's last token, and top-k, top-p and min-p each keep its top one:
            # only the EFT filters, cutting by other distributions, can empty a row.
            return logits, finite
        if disallowed is not None:  # the filters choose among the tokens the grammar allows
            banned = disallowed if banned is None else banned | disallowed
        logits = logits.masked_fill(
            bp.filters.mask(len(rows), self.vocab, parts, banned), -torch.inf
        )
        # Safety net: a row the filters emptied falls back to its scores before them.
        empty = ~torch.isfinite(logits).any(dim=-1, keepdim=True)
        return torch.where(empty, scores, logits), finite

    def draft_logits(
        self,
        rows: list[Sequence],
        lp: torch.Tensor,
        ahead: int,
        disallowed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A drafting model's distribution after the rows' grammars, bans, temperature, top-k,
        top-p and min-p (the EFT filters need the base, which does not draft)."""
        bp = self.params
        scores = lp.nan_to_num(nan=-torch.inf)
        if disallowed is not None:
            scores = scores.masked_fill(disallowed, -torch.inf)
        banned = self._bans(rows, scores, ahead)
        if banned is not None:
            scores = scores.masked_fill(banned, -torch.inf)
        if bp.all_greedy:
            return scores
        logits = top_k_top_p_min_p(scores / bp.temperature.unsqueeze(-1), bp)
        empty = ~torch.isfinite(logits).any(dim=-1, keepdim=True)
        return torch.where(empty, scores, logits)

    def probs(self, logits: torch.Tensor, bp: BatchParams | None = None) -> torch.Tensor:
        """Probabilities of `logits`; a greedy row puts all its mass on its argmax."""
        bp = bp or self.params
        probs = torch.softmax(logits, dim=-1)
        if bp.all_greedy or bp.greedy.any():
            onehot = torch.zeros_like(probs).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
            probs = torch.where(bp.greedy.unsqueeze(-1), onehot, probs)
        return probs

    def noise(
        self,
        shape: tuple[int, ...],
        kind: str,
        active: list[bool] | None = None,
        bp: BatchParams | None = None,
    ) -> torch.Tensor:
        """Per-row random numbers ("uniform" or "exponential"), each seeded row from its own
        generator (only where `active`, so a row's stream never depends on its companions),
        the others from the shared one."""
        bp = bp or self.params
        seeded = [i for i, g in enumerate(bp.generators) if g is not None]
        # Rows left out by `active` keep ones (their draws are not used, but must be finite).
        fresh = active is None or len(seeded) < len(bp.generators)
        out = (
            torch.empty(shape, device=self.device)
            if fresh
            else torch.ones(shape, device=self.device)
        )

        def fill(t: torch.Tensor, g: torch.Generator) -> None:
            if kind == "uniform":
                t.uniform_(generator=g)
            else:
                t.exponential_(generator=g)

        if len(seeded) < len(bp.generators):
            fill(out, self.shared)
        for i in seeded:
            if active is None or active[i]:
                fill(out[i], bp.generators[i])
        return out

    def _bans(
        self, rows: list[Sequence], scores: torch.Tensor, ahead: int | list[int] = 0
    ) -> torch.Tensor | None:
        """[B, V] True for EOS / stop ids of rows still under `min_tokens`, or None."""
        r, c = [], []
        aheads = [ahead] * len(rows) if isinstance(ahead, int) else ahead
        for i, (s, a) in enumerate(zip(rows, aheads)):
            if len(s.output) + a < s.params.min_tokens:
                ids = set(s.params.stop_token_ids) | (
                    set() if s.params.ignore_eos else self.eos_ids
                )
                for tok in ids:
                    if 0 <= tok < self.vocab:
                        r.append(i)
                        c.append(tok)
        if not r:
            return None
        banned = torch.zeros_like(scores, dtype=torch.bool)
        banned[torch.tensor(r, device=self.device), torch.tensor(c, device=self.device)] = True
        # Never remove a row's last allowed token.
        left = (torch.isfinite(scores) & ~banned).any(dim=-1, keepdim=True)
        return banned & left

    def _draw(self, logits: torch.Tensor, bp: BatchParams) -> torch.Tensor:
        argmax = logits.argmax(dim=-1)
        if bp.all_greedy:
            return argmax
        sampled = (torch.softmax(logits, dim=-1) / self.noise(logits.shape, "exponential")).argmax(
            -1
        )
        return torch.where(bp.greedy, argmax, sampled)

    def _logprobs(self, rows, composed, tokens, token_list, bp) -> list[TokenLogprob | None]:
        if bp.max_logprobs < 0:
            return [None] * len(rows)
        chosen = composed.gather(1, tokens.unsqueeze(-1)).squeeze(-1).tolist()
        k = bp.max_logprobs
        top_v, top_i = composed.topk(max(k, 1), dim=-1)
        top_v, top_i = top_v.tolist(), top_i.tolist()
        out: list[TokenLogprob | None] = []
        for i, s in enumerate(rows):
            n = s.params.logprobs
            out.append(
                None
                if n is None
                else TokenLogprob(token_list[i], chosen[i], top_pairs(top_i[i][:n], top_v[i][:n]))
            )
        return out

    def _traces(self, rows, parts, composed, tokens, token_list, bp) -> list[TokenTrace | None]:
        out: list[TokenTrace | None] = [None] * len(rows)
        if not bp.trace_rows:
            return out
        chosen = composed.gather(1, tokens.unsqueeze(-1)).squeeze(-1).tolist()
        per_row: dict[int, tuple[dict[str, float], dict[str, int]]] = {
            i: ({}, {}) for i in bp.trace_rows
        }
        for name, idx, _, lp in parts:
            lps = lp.gather(1, tokens.index_select(0, idx).unsqueeze(-1)).squeeze(-1).tolist()
            best = lp.argmax(dim=-1).tolist()
            for j, row in enumerate(idx.tolist()):
                if row in per_row:
                    per_row[row][0][name] = lps[j]
                    per_row[row][1][name] = best[j]
        for i, (lps, best) in per_row.items():
            out[i] = TokenTrace(token_list[i], chosen[i], lps, best)
        return out


def top_pairs(ids: list[int], values: list[float]) -> list[tuple[int, float]]:
    """(token, log-prob) alternatives, without the tokens a grammar ruled out (-inf): a
    constrained row with fewer than k allowed tokens reports just those."""
    return [(i, v) for i, v in zip(ids, values) if v != -math.inf]


def prompt_logprobs(
    ids: list[int],
    coeffs: dict[str, float],
    logits: dict[str, torch.Tensor],
    params: SamplingParams,
    vocab: int,
    device: torch.device,
) -> tuple[list[TokenLogprob | None], list[TokenTrace | None] | None]:
    """Echo scoring: every prompt token's log-prob under the composed distribution (and its
    trace when asked for) from each model's all-position `logits` [T, V]; the first token has
    neither."""
    t = len(ids)
    rows = torch.arange(t, device=device)
    lps = {m: log_probs(x.to(device), vocab) for m, x in logits.items()}
    composed = combine(
        t, [(rows, torch.full((t,), coeffs[m], device=device), lp) for m, lp in lps.items()]
    )
    k = params.prompt_logprobs or 0
    target = torch.tensor(ids[1:], device=device).unsqueeze(-1)
    chosen = composed[:-1].gather(1, target).squeeze(-1).tolist()
    top_v, top_i = composed[:-1].topk(max(k, 1), dim=-1)
    top_v, top_i = top_v[:, :k].tolist(), top_i[:, :k].tolist()
    out: list[TokenLogprob | None] = [None]
    for j, tok in enumerate(ids[1:]):
        out.append(TokenLogprob(tok, chosen[j], list(zip(top_i[j], top_v[j]))))
    if not params.trace:
        return out, None
    per_model = {m: lp[:-1].gather(1, target).squeeze(-1).tolist() for m, lp in lps.items()}
    best = {m: lp[:-1].argmax(-1).tolist() for m, lp in lps.items()}
    trace: list[TokenTrace | None] = [None]
    for j, tok in enumerate(ids[1:]):
        models = {m: v[j] for m, v in per_model.items()}
        trace.append(TokenTrace(tok, chosen[j], models, {m: v[j] for m, v in best.items()}))
    return out, trace
