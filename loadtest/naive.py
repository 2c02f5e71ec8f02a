"""The naive EFT baselines a user would write without a server, and direct per-model costs.

Sequential baseline: Hugging Face `generate` on the large base, one request at a time, with a
`LogitsProcessor` that at every step feeds the new token to each other model (each with its own
KV cache) and returns `lp_base + sum_e w_e (lp_e - lp_reference)`, the formula of docs/math.md. No
batching across requests, so its throughput is what a batching server has to beat.

Static-batch baseline: the same formula over left-padded batches of requests taken in arrival
order; a batch runs until its longest request is done, and only then does the next one start.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from decoding.family import Family
from loadtest.prompts import random_text

REF_FLOOR = -1e4  # clamp lp_reference as the engine does, so -inf cannot become +inf


class EFTLogitsProcessor(LogitsProcessor):
    """Turns the base model's logits into EFT log-probs by running the small models alongside.

    Each small model keeps its own KV cache; on each call it is fed only the tokens it has not
    seen yet (the whole prompt on the first call, then the one token `generate` just sampled).
    """

    def __init__(self, family: Family, coeffs: dict[str, float]):
        self.vocab = family.vocab_size
        self.reference = family.config.reference
        self.base = family.config.base
        self.coeff_base = coeffs[self.base]
        self.others = [
            (name, family.models[name].module, c) for name, c in coeffs.items() if name != self.base
        ]
        self.caches = {name: DynamicCache() for name, _, _ in self.others}
        self.seen = 0

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        new = input_ids[:, self.seen :]
        self.seen = input_ids.shape[1]
        combined = weighted_lp(scores, self.vocab, self.coeff_base, self.base == self.reference)
        for name, module, c in self.others:
            out = module(input_ids=new, cache=self.caches[name], use_cache=True)
            combined += weighted_lp(out.logits[:, -1], self.vocab, c, name == self.reference)
        result = torch.full_like(scores, float("-inf"))
        result[:, : self.vocab] = combined
        return result


def weighted_lp(logits: torch.Tensor, vocab: int, coeff: float, reference: bool) -> torch.Tensor:
    """`coeff * log_softmax(logits)` over the shared vocabulary; the reference's log-probs are
    clamped from below first, so its -inf cannot turn into +inf."""
    lp = torch.log_softmax(logits[:, :vocab].float(), dim=-1)
    if reference:
        lp = lp.clamp_min(REF_FLOOR)
    return coeff * lp


def eft_coeffs(family: Family, knobs: dict[str, float]) -> dict[str, float]:
    """Coefficient per model, dropping experts with weight 0 (they cost nothing then)."""
    cfg = family.config
    weights = {e: float(knobs.get(e, 0.0)) for e in cfg.experts}
    coeffs = {cfg.base: 1.0, cfg.reference: -sum(weights.values())}
    coeffs.update({e: w for e, w in weights.items() if w != 0.0})
    return coeffs


@dataclass
class NaiveResult:
    requests: int
    output_tokens: int
    seconds: float
    models: list[str]

    @property
    def output_token_throughput(self) -> float:
        return self.output_tokens / self.seconds


def prompt_ids(family: Family, n: int, prompt_len: int, seed: int) -> list[list[int]]:
    """`n` random prompts of exactly `prompt_len` tokens."""
    rng = random.Random(seed)
    tok = family.tokenizer
    out = []
    for _ in range(n):
        ids: list[int] = []
        while len(ids) < prompt_len:
            ids = tok.encode(random_text(rng, 4 * prompt_len), add_special_tokens=False)
        out.append(ids[:prompt_len])
    return out


@torch.no_grad()
def run_naive(
    family: Family,
    knobs: dict[str, float],
    requests: int,
    prompt_len: int,
    max_tokens: int,
    seed: int = 0,
    warmup: int = 1,
) -> NaiveResult:
    """Generate `requests` EFT completions one after another; time all but the warm-up ones."""
    coeffs = eft_coeffs(family, knobs)
    base = family.models[family.config.base].module
    prompts = prompt_ids(family, requests + warmup, prompt_len, seed)
    torch.manual_seed(seed)
    tokens = 0
    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        if i == warmup:
            tokens, start = 0, time.perf_counter()
        proc = EFTLogitsProcessor(family, coeffs)
        out = base.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            logits_processor=LogitsProcessorList([proc]),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,  # = ignore_eos, as the server load sends
            # no built-in warper may touch the logits before the EFT processor sees them
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            pad_token_id=family.tokenizer.pad_token_id,
        )
        tokens += out.shape[1] - len(ids)
    return NaiveResult(requests, tokens, time.perf_counter() - start, list(coeffs))


@torch.no_grad()
def static_batch(
    family: Family,
    coeffs: dict[str, float],
    prompts: list[list[int]],
    steps: int,
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """`steps` EFT tokens for every prompt, as one left-padded batch; returns them [b, steps].

    Every model of the composition runs the whole batch with its own `DynamicCache`; each step
    feeds the sampled tokens to all of them, for every row, until the batch's `steps` are done.
    Tokens are drawn at temperature 1 from `gen`, or greedily without one.
    """
    pad = family.tokenizer.pad_token_id or 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    caches = {name: DynamicCache() for name in coeffs}
    reference = family.config.reference
    out = []
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1] :]
        combined = torch.zeros(len(prompts), family.vocab_size)
        for name, c in coeffs.items():
            model = family.models[name].module
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=caches[name],
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
            combined += weighted_lp(logits, family.vocab_size, c, name == reference)
        if gen is None:
            ids = combined.argmax(-1, keepdim=True)
        else:
            ids = torch.multinomial(torch.softmax(combined, dim=-1), 1, generator=gen)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        out.append(ids)
    return torch.cat(out, dim=1)


def run_static_batches(
    family: Family,
    knobs: dict[str, float],
    workload: list[tuple[str, int]],
    batch: int = 16,
    seed: int = 0,
) -> NaiveResult:
    """The workload's (prompt, max_tokens) requests in static batches of `batch`, in arrival
    order. Each batch runs until its longest request is done; only the tokens each request
    asked for count, the rest is the padding a static batch pays for."""
    coeffs = eft_coeffs(family, knobs)
    tok = family.tokenizer
    prompts = [tok.encode(text, add_special_tokens=True) for text, _ in workload]
    lengths = [k for _, k in workload]
    gen = torch.Generator().manual_seed(seed)
    static_batch(family, coeffs, prompts[:2], 2, gen)  # warm-up: first-call allocations
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        static_batch(family, coeffs, prompts[i : i + batch], max(lengths[i : i + batch]), gen)
    return NaiveResult(len(prompts), sum(lengths), time.perf_counter() - start, list(coeffs))


@torch.no_grad()
def forward_costs(family: Family, batch: int, context: int, steps: int = 7) -> dict[str, float]:
    """Median seconds of one decode step (`batch` rows, `context` tokens of KV each) per model.

    This is the cost of the models themselves, without a server around them: the denominator
    of `eft_vs_ideal`. Models take turns step by step, so a burst of load from another process
    on a shared machine hits them all alike instead of skewing one.
    """
    caches = {}
    for name, m in family.models.items():
        caches[name] = DynamicCache()
        ids = torch.randint(0, family.vocab_size, (batch, context))
        m.module(input_ids=ids, cache=caches[name], use_cache=True, logits_to_keep=1)
    step = torch.randint(0, family.vocab_size, (batch, 1))
    times: dict[str, list[float]] = {name: [] for name in family.models}
    for rep in range(steps + 1):
        for name, m in family.models.items():
            t = time.perf_counter()
            m.module(input_ids=step, cache=caches[name], use_cache=True)
            if rep:  # the first round is warm-up
                times[name].append(time.perf_counter() - t)
            caches[name].crop(-1)  # back to `context` tokens: every step sees the same KV
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
