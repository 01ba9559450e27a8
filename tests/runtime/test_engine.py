"""The server's engine keeps serving when one request's step goes wrong."""

from __future__ import annotations

import pytest
import torch

import tandem
from tandem.errors import TandemError
from tandem.runtime.engine import Engine
from tandem.runtime.sampler import SamplingParams


def test_a_request_whose_token_cannot_be_sampled_fails_alone(tiny_q8):
    """A head row of NaN (a corrupt file, say): greedy decoding still picks a token (argmax),
    sampling refuses the logits. The sampled request fails with that error; the greedy one
    beside it and a request after it finish."""
    prompt = list(range(5, 21))
    greedy = SamplingParams(temperature=0, max_new_tokens=6)
    sampled = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=6, seed=1)
    with tandem.LLM(tiny_q8, ctx_size=64, sequences=2) as llm:
        with torch.no_grad():
            llm.model.lm_head.weight[7] = float("nan")
        engine = Engine(llm, max_batch=2)
        try:
            doomed, beside = engine.submit(prompt, sampled), engine.submit(prompt[::-1], greedy)
            with pytest.raises(TandemError, match="cannot sample"):
                list(doomed.tokens(timeout=60))
            assert len(list(beside.tokens(timeout=60))) == 6
            after = engine.submit(prompt, greedy)
            assert len(list(after.tokens(timeout=60))) == 6
        finally:
            engine.close()
