"""The sampler's filters and penalties against small hand-computed references, and the
corners where every token could be ruled out."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from decoding.request import Composition, SamplingParams
from decoding.sampler import GREEDY_BELOW, Sampler, apply_penalties, top_k_top_p_min_p

V = 5


def row(params: SamplingParams, prompt=(0,), output=(), comp=None, generator=None):
    """A stand-in for a running `Sequence`: what the sampler reads of one."""
    comp = comp or Composition(coeffs={"m": 1.0})
    request = SimpleNamespace(req=SimpleNamespace(prompt_ids={"m": list(prompt)}, composition=comp))
    return SimpleNamespace(params=params, request=request, output=list(output), generator=generator)


def part(lp: torch.Tensor, coef: float = 1.0, name: str = "m"):
    b = lp.shape[0]
    return (name, torch.arange(b), torch.full((b,), coef), lp)


def sampler(rows, eos=frozenset({4})) -> Sampler:
    s = Sampler(V, torch.device("cpu"), frozenset(eos), seed=0)
    s.prepare(rows)
    return s


def log(ps):
    return torch.tensor([ps]).log()


def masked(logits: torch.Tensor) -> list[bool]:
    return torch.isinf(logits[0]).tolist()


def batch_params(**kw):
    rows = [row(SamplingParams(**kw))]
    return sampler(rows).params


def test_top_k_keeps_the_k_most_likely():
    lp = log([0.1, 0.4, 0.2, 0.25, 0.05])
    out = top_k_top_p_min_p(lp.clone(), batch_params(temperature=1.0, top_k=2))
    assert masked(out) == [True, False, True, False, True]


def test_top_p_keeps_the_smallest_set_reaching_p():
    lp = log([0.1, 0.4, 0.2, 0.25, 0.05])
    # Sorted: 0.4, 0.25, 0.2, 0.1, 0.05; mass before each: 0, 0.4, 0.65, 0.85, 0.95.
    out = top_k_top_p_min_p(lp.clone(), batch_params(temperature=1.0, top_p=0.6))
    assert masked(out) == [True, False, True, False, True]
    out = top_k_top_p_min_p(lp.clone(), batch_params(temperature=1.0, top_p=0.66))
    assert masked(out) == [True, False, False, False, True]


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    lp = log([0.1, 0.4, 0.2, 0.25, 0.05])
    out = top_k_top_p_min_p(lp.clone(), batch_params(temperature=1.0, min_p=0.45))
    assert masked(out) == [True, False, False, False, True]  # 0.2 >= 0.45 * 0.4 stays


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    lp = log([0.1, 0.4, 0.2, 0.25, 0.05])
    # Top-2 renormalised: 0.4/0.65 = 0.615, 0.25/0.65 = 0.385: top_p 0.6 keeps only the first.
    out = top_k_top_p_min_p(lp.clone(), batch_params(temperature=1.0, top_k=2, top_p=0.6))
    assert masked(out) == [True, False, True, True, True]


def test_repetition_penalty_of_two_suppresses_a_confident_repeat():
    # A realistic shape: a confident token, a runner-up, and a long tail (a real vocabulary).
    vocab = 1000
    probs = torch.full((vocab,), 0.05 / (vocab - 2))
    probs[0], probs[1] = 0.9, 0.05
    lp = probs.log().unsqueeze(0)
    seen = torch.zeros(1, vocab, dtype=torch.bool)
    seen[0, 0] = True
    zeros = torch.zeros(1, 1)
    counts = torch.zeros(1, vocab)
    out = apply_penalties(lp, seen, counts, torch.tensor([[2.0]]), zeros, zeros)
    # By hand: centre at the median (a tail token); token 0 is above it, so its score halves.
    med = math.log(0.05 / (vocab - 2))
    assert math.isclose(out[0, 0].item(), (math.log(0.9) - med) / 2, rel_tol=1e-5)
    assert math.isclose(out[0, 1].item(), math.log(0.05) - med, rel_tol=1e-5)
    assert out[0].argmax() == 1  # the runner-up wins
    # Without the penalty the repeat stays on top; a seen token below the median is multiplied.
    same = apply_penalties(lp, seen, counts, torch.tensor([[1.0]]), zeros, zeros)
    assert same[0].argmax() == 0
    seen[0, 5] = True
    out = apply_penalties(lp, seen, counts, torch.tensor([[2.0]]), zeros, zeros)
    assert math.isclose(out[0, 5].item(), 0.0, abs_tol=1e-5)  # the median itself stays at 0
    low = log([0.9, 0.06, 0.02, 0.015, 0.005])
    seen5 = torch.tensor([[False, False, False, False, True]])
    out = apply_penalties(low, seen5, torch.zeros(1, V), torch.tensor([[2.0]]), zeros, zeros)
    assert math.isclose(out[0, 4].item(), 2 * (math.log(0.005) - math.log(0.02)), rel_tol=1e-5)


def test_frequency_and_presence_penalties_subtract_counts():
    lp = log([0.2] * 5)
    counts = torch.tensor([[3.0, 1.0, 0.0, 0.0, 0.0]])
    seen = counts > 0
    out = apply_penalties(
        lp, seen, counts, torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([[0.25]])
    )
    assert torch.allclose(out[0] - out[0, 4], torch.tensor([-1.75, -0.75, 0.0, 0.0, 0.0]))


def test_penalties_count_the_prompt_of_every_model_and_each_new_token():
    comp = Composition(coeffs={"a": 1.0, "b": 0.0})
    r = row(SamplingParams(repetition_penalty=2.0, temperature=0.0), comp=comp)
    r.request.req.prompt_ids = {"a": [0], "b": [1]}  # two renderings of one chat
    s = sampler([r])
    assert s.params.penalties.seen[0].tolist() == [True, True, False, False, False]
    s.params.penalties.record(torch.tensor([3]))
    assert s.params.penalties.counts[0].tolist() == [0, 0, 0, 1, 0]


def test_min_tokens_ban_never_removes_the_last_allowed_token():
    lp = log([0.1, 0.2, 0.3, 0.15, 0.25])
    # EOS (4) and stop ids covering every other token: banning them all would leave nothing.
    rows = [row(SamplingParams(min_tokens=2, stop_token_ids=[0, 1, 2, 3], temperature=0.0))]
    assert sampler(rows).sample(rows, [part(lp)]).tokens == [2]


def test_min_tokens_bans_eos_and_stop_ids_while_others_remain():
    lp = log([0.05, 0.05, 0.1, 0.3, 0.5])
    rows = [row(SamplingParams(min_tokens=1, stop_token_ids=[3], temperature=0.0))]
    assert sampler(rows).sample(rows, [part(lp)]).tokens == [2]


def test_base_nucleus_and_min_tokens_ban_together_still_sample_a_real_token():
    """A base nucleus holding only a banned stop id used to leave nothing (token 0 came out)."""
    base = log([0.01, 0.01, 0.08, 0.1, 0.8])
    comp = Composition(coeffs={"m": 1.0}, base_top_p=1e-6, base="m")
    rows = [row(SamplingParams(min_tokens=1, temperature=0.0), comp=comp)]
    out = sampler(rows).sample(rows, [part(base)])
    assert out.tokens == [3]  # the base's best token once EOS (4) is banned


def test_temperature_below_the_floor_is_greedy():
    lp = log([0.1, 0.4, 0.2, 0.25, 0.05])
    for t in (1e-40, GREEDY_BELOW / 2):
        rows = [row(SamplingParams(temperature=t))]
        assert sampler(rows).sample(rows, [part(lp)]).tokens == [1]


def test_extreme_repetition_penalty_stays_finite():
    lp = log([0.5, 0.2, 0.1, 0.1, 0.1])
    rows = [row(SamplingParams(repetition_penalty=1e-300, temperature=1.0), prompt=[1])]
    out = sampler(rows).sample(rows, [part(lp)])
    assert 0 <= out.tokens[0] < V


def test_a_non_finite_row_fails_alone():
    lp = torch.cat([log([0.2] * 5), torch.full((1, V), float("nan"))])
    rows = [row(SamplingParams(temperature=1.0)), row(SamplingParams(temperature=1.0))]
    out = sampler(rows).sample(rows, [part(lp)])
    assert out.tokens[1] == -1 and 0 <= out.tokens[0] < V


def test_sampling_draws_from_the_filtered_distribution():
    lp = log([0.1, 0.4, 0.2, 0.25, 0.05])
    rows = [row(SamplingParams(temperature=1.0, top_k=3)) for _ in range(2000)]
    counts = torch.bincount(
        torch.tensor(sampler(rows).sample(rows, [part(lp.expand(2000, V))]).tokens), minlength=V
    )
    freq = counts.float() / 2000
    want = torch.tensor([0.0, 0.4, 0.2, 0.25, 0.0]) / 0.85
    assert (freq - want).abs().max() < 0.04
