"""Speculative EFT: the small expert drafts, the other models verify, the output is unchanged.

One speculative step for rows that each have a pending token `t0` (EFT paper, speculative
decoding; Leviathan et al. / Chen et al. for the accept rule):

1. **Draft.** Each row's drafter (the family's `draft` model if it names one, else the
   heaviest expert of the row's composition) decodes `k_i` tokens alone: `x_j ~ q_j`, where
   `q_j` is the drafter's distribution after the row's own bans, temperature, top-k, top-p and
   min-p. A draft model outside the composition has a slot of its own per row, which nothing
   else forwards: it catches up on the row's new tokens at the start of each block.
2. **Verify.** Every other model the row uses forwards `[t0, x_1 .. x_k]` in one multi-token
   pass over its KV slots (an expert that drafted reuses its drafting log-probs, and decodes
   `x_k` only when the whole block is accepted), so at each position `j` the engine has the
   exact target `p_j`: the composed EFT distribution after the same bans, temperature and
   filters it samples from otherwise.
3. **Accept.** `x_j` is kept with probability `min(1, p_j(x_j) / q_j(x_j))`, and a row keeps
   its drafts up to the first rejection, which samples from `norm(max(0, p_j - q_j))` instead;
   a fully accepted block adds a bonus token from `p_k`. Each emitted token is then
   distributed exactly as without speculation (greedy rows: one-hot p and q, so the output is
   the greedy output). Every drafted position of every row is scored in one pass (as extra
   rows of the sampler's batch), and the last tokens in one more, so the number of times a
   step waits for the device does not grow with its blocks' length.
4. **Roll back.** Every model's slot keeps `t0` and the accepted tokens; the rest of the block
   is dropped by shortening the slot (the KV past its length is never read).

Rows with penalties do not speculate (their target would depend on the block's own tokens), nor
rows that opted out or have nothing to draft with (no expert and no draft model). `SpecPolicy`
adapts each row's block length to its acceptance, and in `auto` mode speculates at a batch size
only while it measures fewer seconds per generated token there than plain decoding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .composition import combine, log_probs
from .grammar import BlockMasks
from .request import SamplingParams, TokenLogprob
from .runner import ModelRunner, reserve_all, unique_runners
from .sampler import Sampler, top_pairs
from .sequence import Sequence

MAX_BLOCK = 8


def may_speculate(p: SamplingParams) -> bool:
    """Whether a row with these parameters may decode speculatively: not opted out, no
    penalties (the target would depend on the block's own tokens), no trace, and not a seeded
    sample (its random stream must not depend on the batch)."""
    return (
        p.speculative
        and not p.has_penalties
        and not p.trace
        and not (p.seed is not None and p.temperature > 0)
    )


def drafter(seq: Sequence, experts: tuple[str, ...], draft: str | None = None) -> str | None:
    """The model that drafts for this row: the family's `draft` model when the row's request
    was given one (`RequestState.draft`) or its composition uses it, else its heaviest expert;
    None when it does not speculate."""
    if not may_speculate(seq.params):
        return None
    coeffs = seq.request.req.composition.coeffs
    if draft is not None and (
        seq.request.draft == draft or (draft in seq.slots and len(coeffs) >= 2)
    ):
        return draft
    used = [e for e in experts if coeffs.get(e, 0.0) > 0 and e in seq.slots]
    if not used or len(coeffs) < 2:
        return None
    return max(used, key=lambda e: coeffs[e])


@dataclass
class SpecPolicy:
    """When to speculate and how far: `mode` is "off", "auto" or a fixed maximum block."""

    mode: str = "auto"
    probe_every: int = 32  # auto: steps between re-measurements of the option not in use
    # auto: steps each option is timed at a batch size before the faster one is chosen (one
    # step's time on a shared machine can be off by tens of percent, and a wrong choice
    # sticks until the next probe)
    min_samples: int = 3
    block: dict[int, int] = field(default_factory=dict)  # id(Sequence) -> its next k
    cost: dict[tuple[int, bool], float] = field(default_factory=dict)  # (bucket, spec) -> s/tok
    samples: dict[tuple[int, bool], int] = field(default_factory=dict)  # (bucket, spec) -> n
    steps: dict[int, int] = field(default_factory=dict)  # bucket -> steps seen

    @property
    def max_block(self) -> int:
        return int(self.mode) if self.mode.isdigit() else 4

    def use(self, batch: int) -> bool:
        if self.mode == "off" or self.max_block < 1:
            return False
        if self.mode != "auto":
            return True
        bucket = _bucket(batch)
        n = self.steps[bucket] = self.steps.get(bucket, 0) + 1
        if self.samples.get((bucket, True), 0) < self.min_samples:
            return True  # measure speculation first, then plain decoding
        if self.samples.get((bucket, False), 0) < self.min_samples:
            return False
        faster = self.cost[(bucket, True)] < self.cost[(bucket, False)]
        return faster != (n % self.probe_every == 0)  # now and then, re-measure the other

    def observe(self, batch: int, spec: bool, seconds: float, tokens: int) -> None:
        if self.mode != "auto" or tokens == 0:
            return
        key = (_bucket(batch), spec)
        n = self.samples[key] = self.samples.get(key, 0) + 1
        weight = max(0.3, 1 / n)  # the mean of the first samples, then a moving average
        self.cost[key] = (1 - weight) * self.cost.get(key, 0.0) + weight * seconds / tokens

    def speedup(self, batch: int) -> float | None:
        """Measured seconds per token without / with speculation at this batch size (auto mode,
        once both are measured there), else None."""
        bucket = _bucket(batch)
        spec, plain = self.cost.get((bucket, True)), self.cost.get((bucket, False))
        return plain / spec if spec and plain is not None else None

    def block_for(self, seq: Sequence) -> int:
        return self.block.get(id(seq), min(4, self.max_block))

    def accepted(self, seq: Sequence, k: int, accepted: int) -> None:
        """Grow a row's block after a full acceptance, shrink it to what was accepted."""
        if k == 0:  # nothing was drafted (the row's last token)
            return
        if accepted == k:
            self.block[id(seq)] = min(k + 1, self.max_block, MAX_BLOCK)
        else:
            self.block[id(seq)] = max(1, accepted + 1)

    def forget(self, seq: Sequence) -> None:
        self.block.pop(id(seq), None)


def keep_draft(px: torch.Tensor, qx: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The accept rule: a draft x ~ q is kept with probability min(1, p(x) / q(x)), for
    `u` ~ U[0, 1) (`px`, `qx`: p(x) and q(x))."""
    return u * qx < px


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """What a rejected position samples from: max(0, p - q), unnormalised (the exponential
    race normalises); p itself where q covers p everywhere (a rejection there is a rounding
    artefact)."""
    r = (p - q).clamp_min(0)
    return torch.where(r.sum(-1, keepdim=True) <= 0, p, r)


def _bucket(batch: int) -> int:
    return 1 << (batch - 1).bit_length()


@dataclass
class SpecResult:
    tokens: list[list[int]]  # per row, the tokens to emit (1 .. k+1)
    logprobs: list[list[TokenLogprob | None]]  # per row and token, when asked for
    last: torch.Tensor  # [B] each row's last emitted token: the next step's input
    drafted: list[int]  # per row, tokens drafted
    accepted: list[int]  # per row, drafted tokens the verification accepted


@dataclass
class _Block:
    """One speculative step's drafts, as the verification and the accept rule read them."""

    rows: list[Sequence]
    drafters: list[str]
    own: list[bool]  # per row: its drafter is a model of its composition (verified by drafting)
    slot: list[int]  # per row: the drafter's slot it drafts in
    ks: list[int]  # per row: tokens drafted (0 for a row on its last token)
    t0: list[int]  # per row: the pending token the block starts from
    start: dict[str, dict[int, int]]  # model -> slot -> its length before the step
    seen: list[int]  # per draft-slot row: its history's length after catching up
    drafts: list[list[int]]  # per row: x_1 .. x_k
    q: torch.Tensor  # [kmax, b, V] the draft distributions
    draft_lp: torch.Tensor  # [b, kmax, V] the drafters' log-probs at each position
    # [kmax + 1, b, V] what the rows' grammars rule out at each position (None: no grammar)
    disallowed: torch.Tensor | None = None

    def drafted_by(self, i: int) -> str | None:
        """The composition model whose log-probs row `i`'s drafting already computed."""
        return self.drafters[i] if self.own[i] else None


# A model's log-probs over a block: (model, its batch rows, [rows, positions, V]).
Source = tuple[str, list[int], torch.Tensor]


class SpeculativeDecoder:
    def __init__(self, runners: dict[str, ModelRunner], sampler: Sampler, vocab: int,
                 device: torch.device, policy: SpecPolicy):  # fmt: skip
        self.runners = runners
        self.groups = unique_runners(runners)  # each set of weights once, with its entries
        self.sampler = sampler
        self.vocab = vocab
        self.device = device
        self.policy = policy

    @torch.inference_mode()
    def step(
        self, rows: list[Sequence], drafters: list[str], last: torch.Tensor, stats
    ) -> SpecResult:
        blk = self._draft(rows, drafters, last, stats)
        sources = self._verify(blk, stats)
        result = self._accept(blk, sources, stats)
        self._roll_back(blk, result)
        return result

    def _draft(self, rows: list[Sequence], drafters: list[str], last: torch.Tensor, stats):
        """1. k_i tokens per row from its drafter, q_j kept for the accept rule. A drafter
        outside the row's composition (its `draft_slot`) is not verified, so it first catches
        up on what it has not seen: the tokens since its last block (at least t0)."""
        dev, b = self.device, len(rows)
        # A block never drafts past max_tokens: the step emits at most k + 1 tokens.
        ks = [
            min(self.policy.block_for(s), max(0, s.params.max_tokens - len(s.output) - 1))
            for s in rows
        ]
        t0 = last.tolist()
        start = {
            name: {s.slots[name]: self.runners[name].length(s.slots[name])
                   for s in rows if name in s.slots}
            for name in self.runners
        }  # fmt: skip
        own = [d in s.slots for s, d in zip(rows, drafters)]
        for seq, d, o in zip(rows, drafters, own):
            if not o and seq.draft_slot is None:  # its first block: the catch-up fills it
                seq.draft_slot = self.runners[d].allocate(d)
        slot = [s.slots[d] if o else s.draft_slot for s, d, o in zip(rows, drafters, own)]
        for i, seq in enumerate(rows):
            if ks[i] and not self._room(seq, ks[i], drafters[i], own[i], slot[i]):
                ks[i] = 0  # no KV for a block now: this row decodes one token plainly
        kmax = max(ks)
        seen = [0] * b
        q = torch.zeros(kmax, b, self.vocab, device=dev)
        draft_lp = torch.zeros(b, kmax, self.vocab, device=dev)
        drafts = torch.zeros(b, kmax, dtype=torch.long, device=dev)
        inputs = last
        by_drafter = {name: [i for i in range(b) if drafters[i] == name] for name in set(drafters)}
        grammar = self.sampler.params.grammar
        masks = BlockMasks(grammar, kmax, b) if grammar is not None else None
        for j in range(kmax):
            disallowed = None
            if masks is not None:
                # The grammars follow the drafts: one host read per position, for these rows.
                previous = drafts[:, j - 1].tolist() if j else None
                disallowed = masks.at(j, ks, previous)
            for name, rows_of in by_drafter.items():
                idx = [i for i in rows_of if ks[i] > j]
                if not idx:
                    continue
                index = torch.tensor(idx, device=dev)
                runner = self.runners[name]
                t = time.perf_counter()
                if j == 0 and not all(own[i] for i in idx):
                    chunks = []
                    for i in idx:
                        if own[i]:
                            chunks.append([t0[i]])
                            continue
                        history = rows[i].request.req.prompt_ids[name] + rows[i].output
                        chunks.append(history[runner.length(slot[i]) :])  # ends with t0
                        seen[i] = len(history)
                    logits = runner.prefill([slot[i] for i in idx], chunks)
                else:
                    logits = runner.decode([slot[i] for i in idx], inputs.index_select(0, index))
                stats.add_forward(runner.name, t)
                draft_lp[:, j].index_copy_(0, index, log_probs(logits.to(dev), self.vocab))
            q[j] = self.sampler.probs(
                self.sampler.draft_logits(rows, draft_lp[:, j], ahead=j, disallowed=disallowed)
            )
            noise = self.sampler.noise((b, self.vocab), "exponential", [k > j for k in ks])
            drafts[:, j] = (q[j] / noise).argmax(-1)
            inputs = drafts[:, j]
        host = drafts.tolist()
        return _Block(rows, drafters, own, slot, ks, t0, start, seen, host, q, draft_lp,
                      masks.finish(ks, host) if masks is not None else None)  # fmt: skip

    def _room(self, seq: Sequence, k: int, drafter: str, own: bool, slot: int) -> bool:
        """Blocks for a block of k drafts: t0 and the drafts in every model of the row (the
        scheduler gave t0's), and the catch-up and drafts in an outside draft model."""
        want = {m: (h, self.runners[m].length(h) + k + 1) for m, h in seq.slots.items()}
        if not own:
            history = len(seq.request.req.prompt_ids[drafter]) + len(seq.output)
            want[drafter] = (slot, history + k - 1)
        return reserve_all(self.runners, want)

    def _verify(self, blk: _Block, stats) -> list[Source]:
        """2. Every other model of each row's composition forwards [t0, x_1 .. x_k] in one pass
        per set of weights. A drafter of the row's own composition is not run again: its
        log-probs at x_1 .. x_k are the drafting forwards' (the bonus position's is computed
        only when needed)."""
        rows, b = blk.rows, len(blk.rows)
        sources: list[Source] = []
        for name in set(filter(None, map(blk.drafted_by, range(b)))):
            idx = [i for i in range(b) if blk.drafted_by(i) == name]
            sources.append((name, idx, blk.draft_lp[idx]))
        for runner, names in self.groups:
            rows_of = {
                n: [i for i in range(b) if n in rows[i].slots and n != blk.drafted_by(i)]
                for n in names
            }
            rows_of = {n: idx for n, idx in rows_of.items() if idx}
            if not rows_of:
                continue
            calls = {
                n: ([rows[i].slots[n] for i in idx],
                    [[blk.t0[i]] + blk.drafts[i][: blk.ks[i]] for i in idx])
                for n, idx in rows_of.items()
            }  # fmt: skip
            t = time.perf_counter()
            out = runner.prefill_many(calls, keep_all=True)
            stats.add_forward(runner.name, t)
            for name, idx in rows_of.items():
                # [rows, longest chunk, V]; past a row's own block, padding that is never read.
                sources.append((name, idx, log_probs(out[name].to(self.device), self.vocab)))
        return sources

    def _accept(self, blk: _Block, sources: list[Source], stats) -> SpecResult:
        """3. The accept rule, for every drafted position of every row at once: one target
        pass over the drafted positions decides, per row, how many drafts it keeps (up to its
        first rejection); then one more pass gives each row its last token, from the residual
        `norm(max(0, p - q))` at its rejection or from the target at the position after a fully
        accepted block (the bonus)."""
        rows, ks, b, dev = blk.rows, blk.ks, len(blk.rows), self.device
        sampler = self.sampler
        # Virtual rows: row i's drafted position j is `offset[i] + j`.
        vrow = [i for i in range(b) for _ in range(ks[i])]
        vpos = [j for i in range(b) for j in range(ks[i])]
        offset = [0] * b
        for i in range(1, b):
            offset[i] = offset[i - 1] + ks[i - 1]
        kept = [0] * b
        block_composed = None
        reports = sampler.params.max_logprobs >= 0  # a row asks for log-probs
        if vrow:
            bp = sampler.expanded(vrow)
            vseqs = [rows[i] for i in vrow]
            parts = self._parts(blk, sources, [(i, j) for i, j in zip(vrow, vpos)])
            block_composed = combine(len(vrow), [(i, c, lp) for _, i, c, lp in parts])
            vi = torch.tensor(vrow, device=dev)
            vj = torch.tensor(vpos, device=dev)
            masked = None if blk.disallowed is None else blk.disallowed[vj, vi]
            logits, finite = sampler.target_logits(
                vseqs, parts, block_composed, vpos, bp, disallowed=masked
            )
            if masked is not None and reports:  # what rows report: the distribution sampled
                block_composed = self._reported(block_composed, masked, vi)
            p = sampler.probs(logits, bp)
            x = torch.tensor([blk.drafts[i][j] for i, j in zip(vrow, vpos)], device=dev)
            q = blk.q[vj, vi]  # [nv, V]
            px = p.gather(1, x.unsqueeze(-1)).squeeze(-1)
            qx = q.gather(1, x.unsqueeze(-1)).squeeze(-1)
            u = sampler.noise((len(vrow),), "uniform", bp=bp)
            ok = (keep_draft(px, qx, u) & finite).tolist()
            for i in range(b):
                while kept[i] < ks[i] and ok[offset[i] + kept[i]]:
                    kept[i] += 1

        # The last token of each row: the residual at its first rejection, or the bonus.
        rejected = [i for i in range(b) if kept[i] < ks[i]]
        bonus = [i for i in range(b) if kept[i] == ks[i]]
        final_logits = torch.zeros(b, self.vocab, device=dev)
        final_probs = torch.zeros(b, self.vocab, device=dev)
        final_composed = torch.zeros(b, self.vocab, device=dev)
        final_finite = torch.ones(b, dtype=torch.bool, device=dev)
        if rejected:
            at = torch.tensor([offset[i] + kept[i] for i in rejected], device=dev)
            r_index = torch.tensor(rejected, device=dev)
            final_probs.index_copy_(0, r_index, residual(p.index_select(0, at),
                                                         q.index_select(0, at)))  # fmt: skip
            final_logits.index_copy_(0, r_index, logits.index_select(0, at))
            final_composed.index_copy_(0, r_index, block_composed.index_select(0, at))
            final_finite.index_copy_(0, r_index, finite.index_select(0, at))
        if bonus:
            parts = self._parts(blk, sources, [(i, ks[i]) for i in bonus])
            parts += self._bonus_parts(blk, bonus, stats)
            composed = combine(len(bonus), [(i, c, lp) for _, i, c, lp in parts])
            bp = sampler.expanded(bonus)
            b_index = torch.tensor(bonus, device=dev)
            masked = None
            if blk.disallowed is not None:
                at_k = torch.tensor([ks[i] for i in bonus], device=dev)
                masked = blk.disallowed[at_k, b_index]
            logits_b, finite_b = sampler.target_logits(
                [rows[i] for i in bonus],
                parts,
                composed,
                [ks[i] for i in bonus],
                bp,
                disallowed=masked,
            )
            if masked is not None and reports:
                composed = self._reported(composed, masked, b_index)
            final_probs.index_copy_(0, b_index, sampler.probs(logits_b, bp))
            final_logits.index_copy_(0, b_index, logits_b)
            final_composed.index_copy_(0, b_index, composed)
            final_finite.index_copy_(0, b_index, finite_b)
        pick = (final_probs / sampler.noise((b, self.vocab), "exponential")).argmax(-1)
        pick = torch.where(sampler.params.greedy, final_logits.argmax(-1), pick)
        pick = torch.where(final_finite, pick, torch.full_like(pick, -1))
        last_tokens = pick.tolist()

        emitted = [blk.drafts[i][: kept[i]] + [last_tokens[i]] for i in range(b)]
        lps = self._logprobs(blk, emitted, kept, offset, block_composed, final_composed, pick)
        return SpecResult(emitted, lps, pick.clamp_min(0), ks, kept)

    def _reported(self, composed: torch.Tensor, masked: torch.Tensor, rows: torch.Tensor):
        """The composed log-probs of block positions (of batch rows `rows`) as constrained
        rows report them: renormalised over what their grammar allows."""
        grammar = self.sampler.params.grammar
        return grammar.renormalised(composed, masked, grammar.constrained.index_select(0, rows))

    def _parts(self, blk: _Block, sources: list[Source], at: list[tuple[int, int]]):
        """The EFT parts (model, rows, coefficients, log-probs) of the target at positions
        `at` ([(row, position)], one output row each), from the block's log-probs."""
        parts = []
        where = {}  # row -> the output rows that read it
        for out_row, (i, _) in enumerate(at):
            where.setdefault(i, []).append(out_row)
        for name, idx, lps in sources:
            out_rows, flat, coef = [], [], []
            width = lps.shape[1]
            for r, i in enumerate(idx):
                for out_row in where.get(i, ()):
                    j = at[out_row][1]
                    if j >= width or (j == blk.ks[i] and name == blk.drafted_by(i)):
                        continue  # the drafter's bonus position comes from `_bonus_parts`
                    out_rows.append(out_row)
                    flat.append(r * width + j)
                    coef.append(blk.rows[i].request.req.composition.coeffs[name])
            if out_rows:
                lp = lps.reshape(-1, lps.shape[-1]).index_select(
                    0, torch.tensor(flat, device=lps.device)
                )
                parts.append((name, torch.tensor(out_rows, device=self.device),
                              torch.tensor(coef, device=self.device), lp))  # fmt: skip
        return parts

    def _bonus_parts(self, blk: _Block, bonus: list[int], stats):
        """The drafter's log-probs at the bonus position of the fully accepted rows that it
        drafted for as part of their composition: one more decode, of x_k (t0 for an empty
        block), made only for rows that got this far."""
        parts = []
        for name in set(filter(None, (blk.drafted_by(i) for i in bonus))):
            at = [(n, i) for n, i in enumerate(bonus) if blk.drafted_by(i) == name]
            tokens = [blk.drafts[i][blk.ks[i] - 1] if blk.ks[i] else blk.t0[i] for _, i in at]
            runner = self.runners[name]
            t = time.perf_counter()
            logits = runner.decode([blk.slot[i] for _, i in at], torch.tensor(tokens))
            stats.add_forward(runner.name, t)
            coef = [blk.rows[i].request.req.composition.coeffs[name] for _, i in at]
            parts.append((
                name, torch.tensor([n for n, _ in at], device=self.device),
                torch.tensor(coef, device=self.device),
                log_probs(logits.to(self.device), self.vocab),
            ))  # fmt: skip
        return parts

    def _logprobs(self, blk, emitted, kept, offset, block_composed, final_composed, pick):
        """Each emitted token's composed log-prob and top alternatives, for rows asking."""
        rows, b = blk.rows, len(blk.rows)
        want = [s.params.logprobs for s in rows]
        if all(w is None for w in want):
            return [[None] * len(e) for e in emitted]
        k = max(1, max(w for w in want if w is not None))
        final_v = final_composed.gather(1, pick.clamp_min(0).unsqueeze(-1)).squeeze(-1).tolist()
        final_top = [t.tolist() for t in final_composed.topk(k, dim=-1)]
        if block_composed is not None:
            x = torch.tensor([d for i in range(b) for d in blk.drafts[i][: blk.ks[i]]],
                             device=self.device)  # fmt: skip
            block_v = block_composed.gather(1, x.unsqueeze(-1)).squeeze(-1).tolist()
            block_top = [t.tolist() for t in block_composed.topk(k, dim=-1)]
        out: list[list[TokenLogprob | None]] = []
        for i in range(b):
            n = want[i]
            if n is None:
                out.append([None] * len(emitted[i]))
                continue
            row = []
            for j, tok in enumerate(emitted[i]):
                if j < kept[i]:
                    v = offset[i] + j
                    val, (tv, ti) = block_v[v], (block_top[0][v], block_top[1][v])
                else:
                    val, (tv, ti) = final_v[i], (final_top[0][i], final_top[1][i])
                row.append(TokenLogprob(tok, val, top_pairs(ti[:n], tv[:n])))
            out.append(row)
        return out

    def _roll_back(self, blk: _Block, result: SpecResult) -> None:
        """4. Each slot keeps t0 and the accepted drafts. A draft slot holds its history, then
        x_1 .. x_(k-1): it keeps the accepted ones among those."""
        for i, seq in enumerate(blk.rows):
            m, k = len(result.tokens[i]), blk.ks[i]
            self.policy.accepted(seq, k, m - 1)
            held = [blk.t0[i]] + blk.drafts[i][: m - 1]  # t0 and the accepted drafts
            for name, s in seq.slots.items():
                runner = self.runners[name]
                runner.truncate(s, blk.start[name][s] + m)
                if name == blk.drafted_by(i):  # it wrote them from device inputs
                    runner.rewrite(s, blk.start[name][s], held)
            if not blk.own[i] and k > 0:
                kept = min(result.accepted[i], k - 1)
                runner = self.runners[blk.drafters[i]]
                runner.truncate(blk.slot[i], blk.seen[i] + kept)
                runner.rewrite(blk.slot[i], blk.seen[i], blk.drafts[i][:kept])
