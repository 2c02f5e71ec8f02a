"""Knobs -> coefficients, validation, and the conservative-decoding filters."""

from __future__ import annotations

import math

import pytest
import torch

from decoding.composition import (
    combine,
    log_probs,
    make_composition,
    nucleus_mask,
    plausibility_mask,
)
from decoding.request import RequestValidationError


def test_defaults_apply_only_when_no_expert_is_named(tiny_family):
    assert make_composition(tiny_family).knobs["helpful"] == 1.0
    named = make_composition(tiny_family, knobs={"harmless": 0.5})
    assert named.knobs["helpful"] == 0.0 and named.knobs["harmless"] == 0.5
    assert named.coeffs == {"large-base": 1.0, "harmless": 0.5, "small-base": -0.5}


def test_interpolation_coefficients_sum_reference_to_minus_total(tiny_family):
    comp = make_composition(tiny_family, knobs={"helpfulness": 0.25, "harmlessness": 0.75})
    assert comp.coeffs == {"large-base": 1.0, "helpful": 0.25, "harmless": 0.75, "small-base": -1.0}


@pytest.mark.parametrize(
    "knobs,param",
    [
        ({"evil": 1.0}, "eft.evil"),
        ({"helpful": -0.5}, "eft.helpful"),
        ({"helpful": math.inf}, "eft.helpful"),
        ({"helpful": "a lot"}, "eft.helpful"),
        ({"helpful": True}, "eft.helpful"),
        ({"helpful": 99.0}, "eft.helpful"),
        ({"base_top_p": 0.0}, "eft.base_top_p"),
        ({"plausibility": 1.0}, "eft.plausibility"),
        ({"helpful": 1.0, "helpfulness": 1.0}, "eft.helpfulness"),
    ],
)
def test_bad_knobs_are_refused_naming_the_parameter(tiny_family, knobs, param):
    with pytest.raises(RequestValidationError) as err:
        make_composition(tiny_family, knobs=knobs)
    assert err.value.param == param


def test_negative_weights_need_the_operator_flag(tiny_family):
    comp = make_composition(tiny_family, knobs={"helpful": -1.0}, allow_negative=True)
    assert comp.coeffs["small-base"] == 1.0 and comp.coeffs["helpful"] == -1.0


def test_knobs_on_a_single_model_are_refused(tiny_family):
    assert make_composition(tiny_family, "helpful").coeffs == {"helpful": 1.0}
    with pytest.raises(RequestValidationError) as err:
        make_composition(tiny_family, "helpful", {"helpful": 1.0})
    assert err.value.param == "eft"


def test_reference_minus_inf_cannot_become_plus_inf():
    logits = torch.tensor([[0.0, 0.0, -torch.inf]])
    lp = log_probs(logits, 3)
    assert torch.isfinite(lp).all()
    idx = torch.tensor([0])
    out = combine(
        1,
        [
            (idx, torch.tensor([1.0]), log_probs(torch.zeros(1, 3), 3)),
            (idx, torch.tensor([-1.0]), lp),
        ],
    )
    assert torch.isfinite(out).all()
    assert out[0, 2] < out[0, 0] - 100 or out[0, 2] > out[0, 0]  # finite either way, never NaN


def test_logits_wider_than_the_shared_vocabulary_are_cut():
    lp = log_probs(torch.tensor([[1.0, 2.0, 3.0, 50.0]]), 3)
    assert lp.shape == (1, 3)
    assert torch.allclose(lp.exp().sum(), torch.tensor(1.0))


def test_nucleus_mask_keeps_the_smallest_set_reaching_top_p():
    lp = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert nucleus_mask(lp, torch.tensor([0.7])).tolist() == [[False, False, True, True]]
    assert nucleus_mask(lp, torch.tensor([0.1])).tolist() == [[False, True, True, True]]


def test_plausibility_drops_tokens_implausible_under_both():
    base = torch.tensor([[0.6, 0.3, 0.05, 0.05]]).log()
    mix = torch.tensor([[0.1, 0.1, 0.7, 0.1]]).log()
    assert plausibility_mask(base, mix, torch.tensor([0.3])).tolist() == [
        [False, False, False, True]
    ]


def test_a_zero_weight_expert_with_a_ban_leaves_the_plausibility_filter_on(tiny_family):
    # Row 0 uses only `harmless`; row 1 uses `helpful`, so `helpful` is in the batch's mixture
    # with weight 0 for row 0. A ban (min_tokens) puts -inf in the expert distributions: 0 x
    # -inf must not turn row 0's mixture into NaN (which switched its filter off).
    from decoding.composition import BatchFilters

    knobs = [{"harmless": 1.0, "plausibility": 0.3}, {"helpful": 1.0, "plausibility": 0.3}]
    comps = [make_composition(tiny_family, None, k) for k in knobs]
    filters = BatchFilters.build(comps, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    lps = {m: torch.log_softmax(3 * torch.randn(2, 8, generator=gen), -1)
           for m in ("large-base", "helpful", "harmless")}  # fmt: skip
    rows = torch.arange(2)
    parts = [(m, rows, torch.ones(2), lp) for m, lp in lps.items()]
    banned = torch.zeros(2, 8, dtype=torch.bool)
    banned[:, 0] = True
    mask = filters.mask(2, 8, parts, banned)
    # Row 0 alone: the base and harmless, with the ban taken out first.
    base, mix = (torch.log_softmax(lps[m][0].masked_fill(banned[0], -math.inf), -1)
                 for m in ("large-base", "harmless"))  # fmt: skip
    expected = plausibility_mask(base[None], mix[None], torch.tensor([0.3]))[0]
    assert mask[0].tolist() == expected.tolist() and expected.any()
