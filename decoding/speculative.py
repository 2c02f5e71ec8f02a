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
3. **Accept.** Left to right, `x_j` is kept with probability `min(1, p_j(x_j) / q_j(x_j))`; the
   first rejected position samples from `norm(max(0, p_j - q_j))` instead and ends the block; a
   fully accepted block adds a bonus token from `p_k`. Each emitted token is then distributed
   exactly as without speculation (greedy rows: one-hot p and q, so the output is the greedy
   output).
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
from .request import SamplingParams, TokenLogprob
from .runner import ModelRunner, unique_runners
from .sampler import Sampler
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


def _bucket(batch: int) -> int:
    return 1 << (batch - 1).bit_length()


@dataclass
class SpecResult:
    tokens: list[list[int]]  # per row, the tokens to emit (1 .. k+1)
    logprobs: list[list[TokenLogprob | None]]  # per row and token, when asked for
    last: torch.Tensor  # [B] each row's last emitted token: the next step's input
    drafted: list[int]  # per row, tokens drafted
    accepted: list[int]  # per row, drafted tokens the verification accepted


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
        dev = self.device
        b = len(rows)
        # A block never drafts past max_tokens: the step emits at most k + 1 tokens.
        ks = [
            min(self.policy.block_for(s), max(0, s.params.max_tokens - len(s.output) - 1))
            for s in rows
        ]
        kmax = max(ks)
        t0_list = last.tolist()
        start = {name: {s: r.lengths[s] for s in r.active} for name, r in self.runners.items()}

        # 1. Draft: k_i tokens per row from its drafter, q_j kept for the accept rule. A
        # drafter outside the row's composition (its `draft_slot`) is not verified, so it first
        # catches up on what it has not seen: the tokens since its last block (at least t0).
        own = [d in s.slots for s, d in zip(rows, drafters)]
        for seq, d, o in zip(rows, drafters, own):
            if not o and seq.draft_slot is None:  # its first block: the catch-up fills it
                seq.draft_slot = self.runners[d].allocate(d)
        slot = [s.slots[d] if o else s.draft_slot for s, d, o in zip(rows, drafters, own)]
        seen: list[int] = [0] * b  # per draft-slot row: its history's length after catching up
        q = torch.zeros(kmax, b, self.vocab, device=dev)
        drafts = torch.zeros(b, kmax, dtype=torch.long, device=dev)
        inputs = last.clone()
        draft_lp: list[torch.Tensor] = []  # [b, V] per position: each row's drafter log-probs
        for j in range(kmax):
            lp = torch.zeros(b, self.vocab, device=dev)
            draft_lp.append(lp)
            for name in set(drafters):
                idx = [i for i in range(b) if drafters[i] == name and ks[i] > j]
                if not idx:
                    continue
                index = torch.tensor(idx, device=dev)
                runner = self.runners[name]
                t = time.perf_counter()
                if j == 0 and not all(own[i] for i in idx):
                    chunks = []
                    for i in idx:
                        if own[i]:
                            chunks.append([t0_list[i]])
                            continue
                        history = rows[i].request.req.prompt_ids[name] + rows[i].output
                        chunks.append(history[runner.lengths[slot[i]] :])  # ends with t0
                        seen[i] = len(history)
                    logits = runner.prefill([slot[i] for i in idx], chunks)
                else:
                    logits = runner.decode([slot[i] for i in idx], inputs.index_select(0, index))
                stats.add_forward(runner.name, t)
                lp.index_copy_(0, index, log_probs(logits.to(dev), self.vocab))
            q[j] = self.sampler.probs(self.sampler.draft_logits(rows, lp, ahead=j))
            noise = self.sampler.noise((b, self.vocab), "exponential", [k > j for k in ks])
            drafts[:, j] = (q[j] / noise).argmax(-1)
            inputs = drafts[:, j]
        draft_list = drafts.tolist()

        # 2. Verify: every other model forwards [t0, x_1 .. x_k] of its rows in one pass. A
        # drafter of the row's own composition is not run again: its log-probs at x_1 .. x_k
        # are the drafting forwards' (the bonus position's is computed only when needed).
        drafted_by = [drafters[i] if own[i] else None for i in range(b)]
        for name, runner in self.runners.items():
            for i, seq in enumerate(rows):
                if name in seq.slots and name != drafted_by[i]:
                    runner.lengths[seq.slots[name]] = start[name][seq.slots[name]]
        per_pos: list[list] = [[] for _ in range(kmax + 1)]  # position -> parts
        for name in set(filter(None, drafted_by)):
            for j in range(kmax):
                idx = [i for i in range(b) if drafted_by[i] == name and ks[i] > j]
                if idx:
                    index, coef = self._rows(rows, name, idx)
                    per_pos[j].append((name, index, coef, draft_lp[j].index_select(0, index)))
        for runner, names in self.groups:
            rows_of = {
                n: [i for i in range(b) if n in rows[i].slots and n != drafted_by[i]] for n in names
            }
            rows_of = {n: idx for n, idx in rows_of.items() if idx}
            if not rows_of:
                continue
            calls = {
                n: ([rows[i].slots[n] for i in idx],
                    [[t0_list[i]] + draft_list[i][: ks[i]] for i in idx])
                for n, idx in rows_of.items()
            }  # fmt: skip
            t = time.perf_counter()
            out = runner.prefill_many(calls, keep_all=True)
            stats.add_forward(runner.name, t)
            for name, idx in rows_of.items():
                index, coef = self._rows(rows, name, idx)
                lps = log_probs(out[name].to(dev), self.vocab)  # [rows, longest chunk, V]
                for j in range(kmax + 1):
                    # Past a row's own block its entries are padding, never read.
                    per_pos[j].append((name, index, coef, lps[:, min(j, lps.shape[1] - 1)]))

        # 3. Accept left to right; the first rejection resamples from the residual.
        emitted: list[list[int]] = [[] for _ in range(b)]
        lps: list[list[TokenLogprob | None]] = [[] for _ in range(b)]
        open_rows = [True] * b
        want_lp = [s.params.logprobs for s in rows]
        accepted = [0] * b
        for j in range(kmax + 1):
            parts = per_pos[j] + self._bonus_parts(rows, drafted_by, ks, j, open_rows,
                                                   t0_list, draft_list, slot, stats)  # fmt: skip
            composed = combine(b, [(i, c, lp) for _, i, c, lp in parts])
            logits, finite = self.sampler.target_logits(rows, parts, composed, ahead=j)
            p = self.sampler.probs(logits)
            x = drafts[:, j] if j < kmax else torch.zeros(b, dtype=torch.long, device=dev)
            has_draft = torch.tensor([ks[i] > j for i in range(b)], device=dev)
            if j < kmax:
                px = p.gather(1, x.unsqueeze(-1)).squeeze(-1)
                qx = q[j].gather(1, x.unsqueeze(-1)).squeeze(-1)
                u = self.sampler.noise(
                    (b,), "uniform", [o and k > j for o, k in zip(open_rows, ks)]
                )
                keep = has_draft & (u * qx < px)
                residual = (p - q[j]).clamp_min(0)
                empty = residual.sum(-1, keepdim=True) <= 0
                residual = torch.where(empty, p, residual)
                # Rows whose block ended before j take their bonus token from p.
                residual = torch.where(has_draft.unsqueeze(-1), residual, p)
            else:
                keep = torch.zeros(b, dtype=torch.bool, device=dev)
                residual = p
            # A row whose block ends here draws from the residual (rejected) or p (bonus).
            ending = [o and not kp for o, kp in zip(open_rows, keep.tolist())]
            noise = self.sampler.noise((b, self.vocab), "exponential", ending)
            pick = (residual / noise).argmax(-1)
            pick = torch.where(self.sampler.params.greedy, logits.argmax(-1), pick)
            choice = torch.where(keep, x, pick)
            choice = torch.where(finite, choice, torch.full_like(choice, -1))
            chosen = choice.tolist()
            kept = keep.tolist()
            lp_rows = None
            if any(w is not None for w in want_lp):
                safe = choice.clamp_min(0).unsqueeze(-1)
                lp_vals = composed.gather(1, safe).squeeze(-1).tolist()
                kk = max(w for w in want_lp if w is not None)
                top_v, top_i = composed.topk(max(kk, 1), dim=-1)
                lp_rows = (lp_vals, top_v.tolist(), top_i.tolist())
            for i in range(b):
                if not open_rows[i]:
                    continue
                emitted[i].append(chosen[i])
                if lp_rows is not None and want_lp[i] is not None:
                    n = want_lp[i]
                    pairs = list(zip(lp_rows[2][i][:n], lp_rows[1][i][:n]))
                    lps[i].append(TokenLogprob(chosen[i], lp_rows[0][i], pairs))
                else:
                    lps[i].append(None)
                if kept[i] and chosen[i] >= 0:
                    accepted[i] += 1
                else:
                    open_rows[i] = False
            if not any(open_rows):
                break

        # 4. Roll back: each slot keeps t0 and the accepted drafts. A draft slot holds its
        # history, then x_1 .. x_(k-1): it keeps the accepted ones among those.
        for i, seq in enumerate(rows):
            m = len(emitted[i])
            self.policy.accepted(seq, ks[i], m - 1)
            for name, s in seq.slots.items():
                self.runners[name].lengths[s] = start[name][s] + m
            if not own[i] and ks[i] > 0:
                kept = seen[i] + min(accepted[i], ks[i] - 1)
                self.runners[drafters[i]].lengths[slot[i]] = kept
        last_tokens = torch.tensor([max(e[-1], 0) for e in emitted], device=dev)
        return SpecResult(emitted, lps, last_tokens, ks, accepted)

    def _rows(self, rows: list[Sequence], name: str, idx: list[int]):
        """The batch rows `idx` and their coefficients for `name`, as tensors (a part's head)."""
        index = torch.tensor(idx, device=self.device)
        coef = torch.tensor(
            [rows[i].request.req.composition.coeffs[name] for i in idx], device=self.device
        )
        return index, coef

    def _bonus_parts(self, rows, drafted_by, ks, j, open_rows, t0_list, draft_list, slot, stats):
        """The drafter's log-probs at position j for the rows whose block is fully accepted
        there (their bonus token needs the whole composition): one more decode of x_k (t0 for
        an empty block), made only for rows that got this far."""
        parts = []
        for name in set(filter(None, drafted_by)):
            idx = [i for i in range(len(rows))
                   if drafted_by[i] == name and ks[i] == j and open_rows[i]]  # fmt: skip
            if not idx:
                continue
            tokens = [draft_list[i][j - 1] if j else t0_list[i] for i in idx]
            runner = self.runners[name]
            t = time.perf_counter()
            logits = runner.decode([slot[i] for i in idx], torch.tensor(tokens))
            stats.add_forward(runner.name, t)
            index, coef = self._rows(rows, name, idx)
            parts.append((name, index, coef, log_probs(logits.to(self.device), self.vocab)))
        return parts
