"""Per-row sampling over the composed distribution (TGI's "heterogeneous" chooser).

Every row of a batch has its own temperature, top-k/top-p/min-p, penalties and, when the request
gave a seed, its own torch.Generator. The parameters live in tensors that are rebuilt only when
the batch's membership changes; a step applies them in a few batched ops.

Sampling uses the exponential race (argmax p / E, E ~ Exp(1)), which draws exactly from p and
lets each seeded row draw its noise from its own generator: a seeded request returns the same
tokens whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .request import SamplingParams


@dataclass
class BatchSampling:
    temperature: torch.Tensor  # [B] float; rows with 0 are greedy (their entry is set to 1)
    greedy: torch.Tensor  # [B] bool
    top_k: torch.Tensor  # [B] long; V when disabled
    top_p: torch.Tensor  # [B] float
    min_p: torch.Tensor  # [B] float
    repetition: torch.Tensor  # [B] float
    presence: torch.Tensor  # [B] float
    frequency: torch.Tensor  # [B] float
    generators: list[torch.Generator | None]  # per row; None draws from the shared generator
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    penalty_rows: list[int]  # rows with any penalty set
    max_logprobs: int  # largest `logprobs` k asked for in the batch, -1 if none

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        vocab_size: int,
        device: torch.device,
    ) -> BatchSampling:
        def t(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        greedy = [p.temperature <= 0.0 for p in params]
        top_k = [p.top_k if p.top_k and p.top_k > 0 else vocab_size for p in params]
        return cls(
            temperature=t(
                [1.0 if g else p.temperature for p, g in zip(params, greedy)], torch.float32
            ),
            greedy=t(greedy, torch.bool),
            top_k=t([min(k, vocab_size) for k in top_k], torch.long),
            top_p=t([p.top_p for p in params], torch.float32),
            min_p=t([p.min_p for p in params], torch.float32),
            repetition=t([p.repetition_penalty for p in params], torch.float32),
            presence=t([p.presence_penalty for p in params], torch.float32),
            frequency=t([p.frequency_penalty for p in params], torch.float32),
            generators=generators,
            all_greedy=all(greedy),
            any_top_k=any(k < vocab_size for k, g in zip(top_k, greedy) if not g),
            any_top_p=any(p.top_p < 1.0 for p, g in zip(params, greedy) if not g),
            any_min_p=any(p.min_p > 0.0 for p, g in zip(params, greedy) if not g),
            penalty_rows=[
                i
                for i, p in enumerate(params)
                if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
            ],
            max_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=-1),
        )


def apply_penalties(
    scores: torch.Tensor,
    bs: BatchSampling,
    prompts: list[list[int]],
    outputs: list[list[int]],
) -> torch.Tensor:
    """vLLM's penalties: repetition over prompt+output tokens, presence/frequency over output.

    Scores are log-probs (<= 0), so the repetition penalty multiplies them (pushes them down).
    `prompts`/`outputs` hold the token ids of the rows in `bs.penalty_rows`, in that order.
    """
    rows = torch.tensor(bs.penalty_rows, device=scores.device)
    vocab = scores.shape[-1]
    sub = scores.index_select(0, rows)
    counts = torch.zeros(len(bs.penalty_rows), vocab + 1, device=scores.device)
    seen = torch.zeros_like(counts, dtype=torch.bool)
    width = max((len(o) for o in outputs), default=0)
    if width:
        ids = torch.tensor([o + [vocab] * (width - len(o)) for o in outputs], device=scores.device)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    pwidth = max(len(p) for p in prompts)
    pids = torch.tensor([p + [vocab] * (pwidth - len(p)) for p in prompts], device=scores.device)
    seen.scatter_(1, pids, True)
    counts, seen = counts[:, :vocab], (seen[:, :vocab] | (counts[:, :vocab] > 0))
    rep = bs.repetition.index_select(0, rows).unsqueeze(-1)
    penalised = torch.where(sub > 0, sub / rep, sub * rep)
    sub = torch.where(seen, penalised, sub)
    sub = sub - bs.frequency.index_select(0, rows).unsqueeze(-1) * counts
    sub = sub - bs.presence.index_select(0, rows).unsqueeze(-1) * (counts > 0)
    return scores.index_copy(0, rows, sub)


def sample(scores: torch.Tensor, bs: BatchSampling, shared: torch.Generator) -> torch.Tensor:
    """Pick one token per row from `scores` (log-probs with filtered tokens at -inf)."""
    argmax = scores.argmax(dim=-1)
    if bs.all_greedy:
        return argmax
    logits = scores / bs.temperature.unsqueeze(-1)
    if bs.any_top_k or bs.any_top_p:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if bs.any_top_k:
            ranks = torch.arange(logits.shape[-1], device=logits.device)
            drop |= ranks.unsqueeze(0) >= bs.top_k.unsqueeze(-1)
        if bs.any_top_p:
            probs_sorted = torch.softmax(sorted_logits.masked_fill(drop, -torch.inf), dim=-1)
            # Drop a token when the mass strictly before it already reaches top_p.
            drop |= (probs_sorted.cumsum(-1) - probs_sorted) >= bs.top_p.unsqueeze(-1)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), -torch.inf)
    probs = torch.softmax(logits, dim=-1)
    if bs.any_min_p:
        low = probs < bs.min_p.unsqueeze(-1) * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(low, 0.0)
    noise = torch.empty_like(probs)
    shared_rows = [i for i, g in enumerate(bs.generators) if g is None]
    if len(shared_rows) == len(bs.generators):
        noise.exponential_(generator=shared)
    else:
        if shared_rows:
            noise[shared_rows] = torch.empty(
                len(shared_rows), probs.shape[-1], device=probs.device
            ).exponential_(generator=shared)
        for i, g in enumerate(bs.generators):
            if g is not None:
                noise[i].exponential_(generator=g)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(bs.greedy, argmax, sampled)
