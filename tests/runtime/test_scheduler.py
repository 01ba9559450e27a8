"""The scheduler in plain Python: who runs in the next forward pass."""

from __future__ import annotations

from tandem.runtime.scheduler import Scheduler, SeqState


def admit_all(s: Scheduler):
    return s.admit(lambda seq, free: (free[0], 0))


def test_decoders_first_then_prompts_in_chunks():
    s = Scheduler(n_slots=4, token_budget=10)
    a, b = SeqState("a", prompt_len=3), SeqState("b", prompt_len=25)
    s.add(a)
    s.add(b)
    admit_all(s)
    step = s.schedule()
    assert [(q.id, n) for q, n in step.work] == [("a", 3), ("b", 7)]  # budget 10 shared
    a.cached, b.cached = 3, 7
    step = s.schedule()
    assert [(q.id, n) for q, n in step.work] == [("a", 1), ("b", 9)]  # a decodes, b goes on
    b.cached = 25
    assert [(q.id, n) for q, n in s.schedule().work] == [("a", 1), ("b", 1)]


def test_slots_limit_running_and_free_on_finish():
    s = Scheduler(n_slots=2, token_budget=100)
    seqs = [SeqState(str(i), prompt_len=4) for i in range(3)]
    for q in seqs:
        s.add(q)
    admit_all(s)
    assert [q.id for q in s.running] == ["0", "1"] and [q.id for q in s.waiting] == ["2"]
    s.finish(seqs[0])
    admit_all(s)
    assert [q.id for q in s.running] == ["1", "2"] and seqs[2].slot == 0


def test_queue_limit():
    s = Scheduler(n_slots=1, token_budget=8, max_waiting=2)
    s.add(SeqState("a", 1))
    s.add(SeqState("b", 1))
    assert not s.can_accept()


def test_prefix_reuse_skips_cached_prompt_tokens():
    s = Scheduler(n_slots=1, token_budget=100)
    q = SeqState("a", prompt_len=50)
    s.add(q)
    s.admit(lambda seq, free: (free[0], 40))  # the slot already holds 40 of these tokens
    assert [(x.id, n) for x, n in s.schedule().work] == [("a", 10)]
