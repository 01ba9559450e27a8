"""The server's engine keeps serving when one request's step goes wrong."""

from __future__ import annotations

import pytest
import torch

import tandem
from tandem.errors import TandemError
from tandem.models.deepseek_v3 import MoE
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


def test_a_request_whose_slot_cannot_be_set_up_fails_alone(tiny_q8, monkeypatch):
    """The KV cache of a new slot fails to allocate (out of memory; the allocation is made to
    fail once here): that request gets the error, the engine serves the next one."""
    greedy = SamplingParams(temperature=0, max_new_tokens=4)
    with tandem.LLM(tiny_q8, ctx_size=64, sequences=2) as llm:
        real, failures = llm.new_cache, [MemoryError("no room for the KV cache")]

        def new_cache():
            if failures:
                raise failures.pop()
            return real()

        monkeypatch.setattr(llm, "new_cache", new_cache)
        engine = Engine(llm, max_batch=2)
        try:
            with pytest.raises(MemoryError, match="no room for the KV cache"):
                list(engine.submit(list(range(5, 15)), greedy).tokens(timeout=60))
            assert len(list(engine.submit(list(range(5, 15)), greedy).tokens(timeout=60))) == 4
            assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0
        finally:
            engine.close()


def test_decode_only_steps_are_counted_by_rows(tiny_q8):
    """Two requests admitted together: one step reads both prompts (not a decode step), then
    each of their other tokens comes from a step where both rows decode. The routed experts
    those steps read: at most k per row and layer, at least one per layer."""
    greedy = SamplingParams(temperature=0, max_new_tokens=6)
    with tandem.LLM(tiny_q8, ctx_size=64, sequences=2) as llm:
        c = llm.config
        engine = Engine(llm, max_batch=2)
        try:
            with engine._cond:  # the engine thread sees both at once
                reqs = [engine.submit(list(range(5, 21)), greedy), engine.submit(list(range(40, 56)), greedy)]
            assert all(len(list(r.tokens(timeout=60))) == 6 for r in reqs)
        finally:
            engine.close()
        steps = engine.metrics.decode_steps
        assert set(steps) == {2} and steps[2].steps == 5 and steps[2].seconds > 0
        moe_layers = sum(1 for block in llm.model.blocks if isinstance(block.ffn, MoE))
        per_expert = 3 * c.n_embd * c.n_ff_expert * 34 // 32  # gate, up, down in Q8_0
        most = 5 * moe_layers * min(2 * c.n_expert_used, c.n_expert) * per_expert
        assert moe_layers == 2 and 5 * moe_layers * per_expert <= steps[2].expert_bytes <= most
