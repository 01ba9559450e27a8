"""Sampling: each option changes the distribution as its definition says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tandem.errors import TandemError
from tandem.runtime.sampler import Sampler, SamplingParams

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def draws(params: SamplingParams, n: int = 400, history=()) -> torch.Tensor:
    sampler = Sampler(params)
    return torch.tensor([sampler(LOGITS, list(history)) for _ in range(n)])


def test_greedy_is_argmax():
    assert set(draws(SamplingParams(temperature=0), 20).tolist()) == {0}


def test_same_seed_same_tokens_other_seed_other_tokens():
    p = SamplingParams(temperature=1.0, top_p=1.0, seed=7)
    assert torch.equal(draws(p), draws(p))
    assert not torch.equal(draws(p), draws(p.updated(seed=8)))


def test_top_k_and_top_p_and_min_p_cut_the_tail():
    assert set(draws(SamplingParams(temperature=1.0, top_k=2, top_p=1.0, seed=1)).tolist()) <= {0, 1}
    probs = LOGITS.softmax(0)  # 0.56, 0.21, 0.13, 0.08, ...: top_p 0.75 keeps 2 tokens
    assert probs[:2].sum() > 0.75 > probs[0]
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.75, seed=1)).tolist()) == {0, 1}
    # min_p 0.3: tokens below 0.3 * 0.56 drop out, which leaves tokens 0 and 1
    assert set(draws(SamplingParams(temperature=1.0, top_p=1.0, min_p=0.3, seed=1)).tolist()) == {0, 1}


def test_temperature_flattens():
    hot = draws(SamplingParams(temperature=5.0, top_p=1.0, seed=3), 2000)
    cold = draws(SamplingParams(temperature=0.3, top_p=1.0, seed=3), 2000)
    assert (hot == 0).float().mean() < 0.5 < (cold == 0).float().mean()


def test_penalties_push_seen_tokens_down():
    p = SamplingParams(temperature=0, repetition_penalty=3.0)
    assert draws(p, 1, history=[0])[0] == 1  # 2.0 / 3 < 1.0
    assert draws(SamplingParams(temperature=0, presence_penalty=1.5), 1, history=[0])[0] == 1
    freq = SamplingParams(temperature=0, frequency_penalty=0.4)
    assert draws(freq, 1, history=[0, 0])[0] == 0  # 2.0 - 0.8 > 1.0
    assert draws(freq, 1, history=[0, 0, 0])[0] == 1  # 2.0 - 1.2 < 1.0


def test_defaults_from_file_else_r1():
    assert SamplingParams.defaults_for({}).temperature == 0.6
    assert SamplingParams.defaults_for({}).top_p == 0.95
    p = SamplingParams.defaults_for({"general.sampling.temp": 0.2, "general.sampling.top_k": 40})
    assert (p.temperature, p.top_k, p.top_p) == (0.2, 40, 0.95)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(min_p=1),
                                 dict(top_k=-2), dict(repetition_penalty=0), dict(max_new_tokens=0)])
def test_bad_parameters(bad):
    with pytest.raises(TandemError, match="bad sampling parameters"):
        SamplingParams(**bad)


def nucleus_by_definition(logits: torch.Tensor, temperature: float, top_p: float) -> set[int]:
    """Top-p's definition in numpy, over a full sort: the fewest most likely tokens whose
    probability reaches top_p."""
    z = logits.double().numpy() / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]
    return set(order[before < top_p].tolist())


@pytest.mark.parametrize("spread", [0.5, 3.0, 40.0])  # nucleus of thousands, hundreds, a few
def test_top_p_draws_only_from_the_nucleus_of_a_large_vocabulary(spread):
    """A 20k vocabulary whose nucleus lies past the first tries (256, 4096 tokens) or inside:
    every draw falls in the nucleus, and a wide nucleus is drawn from well beyond its top 256."""
    logits = torch.randn(20_000, generator=torch.Generator().manual_seed(11)) * spread
    nucleus = nucleus_by_definition(logits, 0.8, 0.9)
    sampler = Sampler(SamplingParams(temperature=0.8, top_p=0.9, seed=5))
    drawn = [sampler(logits, []) for _ in range(600)]
    assert set(drawn) <= nucleus
    ranks = {int(t): r for r, t in enumerate(torch.argsort(logits, descending=True))}
    if len(nucleus) > 256:
        assert max(ranks[t] for t in drawn) > 256


def test_draws_follow_the_probabilities():
    """Without cuts, token frequencies match softmax(logits / T) (8000 draws: each
    frequency within 4 standard errors)."""
    probs = (LOGITS / 0.7).softmax(0)
    freq = torch.bincount(draws(SamplingParams(temperature=0.7, top_p=1.0, seed=2), 8000),
                          minlength=len(LOGITS)).double() / 8000
    err = (probs.double() * (1 - probs.double()) / 8000).sqrt()
    assert ((freq - probs.double()).abs() <= 4 * err + 1e-9).all(), (freq, probs)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_logits_that_are_not_numbers_are_refused(top_p, bad_value):
    bad = LOGITS.clone()
    bad[2] = bad_value
    with pytest.raises(TandemError, match="cannot sample: the probabilities sum to nan"):
        Sampler(SamplingParams(temperature=1.0, top_p=top_p, seed=1))(bad, [])
