"""Sampling: each option changes the distribution as its definition says."""

from __future__ import annotations

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
