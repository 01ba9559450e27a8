"""Decode steps through runtime.decode_graphs equal the eager forward pass.

The reference is the eager model one token at a time (what decode did before), and, loosely, the
eager model over the whole sequence at once (`LLM.logits`; batched expert kernels round
differently): the steps must give the same next-token logits position by position, across
attention buckets, with the routed experts on the CPU. On the CPU the segments run uncaptured
(the step logic: cuts at the MoE layers, static buffers, bucketed masked attention, cache writes
by position tensor); with a GPU the same steps run as captured CUDA graphs.
"""

from __future__ import annotations

import pytest
import torch

import tandem
from logit_checks import relative_error, top1_agreement
from tandem.models.deepseek_v3 import MoE
from tandem.placement.rules import Rule
from tandem.runtime import decode_graphs
from tandem.runtime.decode_graphs import DecodeGraphs, StepPieces

CPU_RULES = [Rule(r"ffn_(gate|up|down)_exps\.", "cpu", "cpu"), Rule(r"^token_embd\.", "cpu", "ggml"),
             Rule(".", "cpu", "torch")]
PROMPT, STEPS = 9, 30


def tokens(n: int) -> list[int]:
    return torch.randint(1, 500, (n,), generator=torch.Generator().manual_seed(3)).tolist()


@torch.inference_mode()
def eager_steps(llm, sequence: list[int]) -> torch.Tensor:
    llm.logits(sequence[:PROMPT])
    return torch.cat([llm._forward(torch.tensor([sequence[p]]), p).float().cpu()
                      for p in range(PROMPT, len(sequence))])


def stepwise(llm, sequence: list[int], capture: bool, bucket: int,
             pieces: StepPieces | None = None) -> torch.Tensor:
    """Logits after each token past the prompt, one decode step at a time."""
    llm.logits(sequence[:PROMPT])  # fills the cache for the prompt
    device = next(llm.model.parameters()).device
    steps = DecodeGraphs(llm.model, [llm._cache], device, capture=capture, bucket=bucket,
                         pieces=pieces or StepPieces())
    out = []
    for position in range(PROMPT, len(sequence)):
        out.append(steps.step([sequence[position]], [position]).float().cpu().clone())
    return torch.cat(out)


def test_uncaptured_steps_equal_the_eager_forward(tiny_q8):
    sequence = tokens(PROMPT + STEPS)
    with tandem.LLM(tiny_q8, rules=CPU_RULES, ctx_size=48) as llm:
        assert any(isinstance(b.ffn, MoE) for b in llm.model.blocks)
        whole = llm.logits(sequence)[PROMPT:]
        eager = eager_steps(llm, sequence)
        ours = stepwise(llm, sequence, capture=False, bucket=12)  # buckets 12, 24, 48 (the end)
    assert ours.shape == eager.shape
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-5)
    assert relative_error(ours, whole) < 0.01


def test_compiled_pieces_equal_the_eager_steps_and_compile_once_for_all_layers(tiny_q8):
    """TANDEM_COMPILE_DECODE's pieces through torch.compile (inductor on the CPU here): the
    same logits as the eager pieces, and one compiled graph per piece and bucket serves every
    layer (the layers' modules differ only in their tensors)."""
    from torch._dynamo.utils import counters

    sequence = tokens(PROMPT + 6)
    with tandem.LLM(tiny_q8, rules=CPU_RULES, ctx_size=48) as llm:
        n_layers = len(llm.model.blocks)
        eager = stepwise(llm, sequence, capture=False, bucket=48)
        torch._dynamo.reset()
        counters.clear()
        ours = stepwise(llm, sequence, capture=False, bucket=48, pieces=StepPieces.compiled())
    torch.testing.assert_close(ours, eager, rtol=1e-4, atol=1e-4)
    graphs = counters["stats"]["unique_graphs"]
    assert n_layers >= 3 and 0 < graphs <= 4, f"{graphs} graphs for {n_layers} layers"  # a piece each


def test_decode_pieces_are_compiled_on_cuda_unless_0_and_eager_elsewhere_unless_1(monkeypatch):
    """The default of TANDEM_COMPILE_DECODE by device (no GPU needed: compiling is lazy)."""
    eager, cuda, cpu = StepPieces(), torch.device("cuda"), torch.device("cpu")
    for setting, on_cuda, on_cpu in (("", False, True), ("0", True, True), ("1", False, False)):
        monkeypatch.setenv(decode_graphs.COMPILE_ENV, setting)
        assert (decode_graphs.pieces_for(cuda) == eager) == on_cuda, f"cuda, {setting!r}"
        assert (decode_graphs.pieces_for(cpu) == eager) == on_cpu, f"cpu, {setting!r}"


def test_steps_prefetch_the_next_layers_predicted_experts_and_keep_the_logits(tmp_path):
    """TANDEM_SHARE_PREFETCH in the steps (uncaptured, the share's "GPU" on the CPU): each MoE
    segment predicts the next MoE's experts, the step copies them ahead, and the logits stay
    those of the CPU experts alone (the share's float sums against int8 activations)."""
    from tandem.bench import synth
    from tandem.kernels.experts import CpuExperts
    from tandem.kernels.gpu_share import GpuShare, ShareBalance

    path = tmp_path / "iq1.gguf"
    synth.write(synth.plan("tiny", "ud-iq1_s"), path)
    sequence = tokens(PROMPT + 8)
    with tandem.LLM(path, rules=CPU_RULES, ctx_size=48) as llm:
        alone = stepwise(llm, sequence, capture=False, bucket=48)
        experts = [b.ffn.experts for b in llm.model.blocks if isinstance(b.ffn, MoE)]
        assert len(experts) >= 2 and all(isinstance(e, CpuExperts) for e in experts)
        share = GpuShare("cpu", max_experts=8)
        share.prefetch_rows = 3
        for e in experts:
            e.share, e.balance = share, ShareBalance(0.25, fixed=True)
        prefetched = []
        original = share.prefetch
        share.prefetch = lambda tensors, ids: (prefetched.append(list(ids)), original(tensors, ids))
        ours = stepwise(llm, sequence, capture=False, bucket=48)
    assert len(prefetched) == 8 * (len(experts) - 1)  # every step, every MoE after the first
    assert share._ahead is not None and share._ahead.row_of
    assert share.counts["prefetched"] == sum(min(3, len(set(p))) for p in prefetched)
    assert relative_error(ours, alone) < 0.02


def test_steps_of_several_sequences_equal_each_one_stepped_alone(tiny_q8):
    """Three sequences in one object (the server's slots), the third idle for the first steps
    (its row runs at the last cache row, its experts skipped): every active row's logits equal
    the eager forward of that sequence alone, and the idle one's cache is intact when it joins."""
    from tandem.models.decoder import Segment

    seqs = [tokens(PROMPT + STEPS), tokens(PROMPT + STEPS + 3)[3:], tokens(PROMPT + STEPS + 7)[7:]]
    last_row, joins_at_step = 47, 5
    with tandem.LLM(tiny_q8, rules=CPU_RULES, ctx_size=last_row + 1) as llm, torch.inference_mode():
        model = llm.model
        ours_caches, ref_caches = [llm.new_cache() for _ in seqs], [llm.new_cache() for _ in seqs]
        for seq, ours, ref in zip(seqs, ours_caches, ref_caches, strict=True):
            for cache in (ours, ref):
                model(torch.tensor(seq[:PROMPT]), [Segment(cache, 0, PROMPT)], last_only=True)
        steps = DecodeGraphs(model, ours_caches, torch.device("cpu"), capture=False, bucket=16)
        at = [PROMPT] * len(seqs)  # each sequence's next position
        for step in range(STEPS):
            active = [0, 1] if step < joins_at_step else [0, 1, 2]
            step_tokens = [seq[at[b]] if b in active else 0 for b, seq in enumerate(seqs)]
            positions = [at[b] if b in active else last_row for b in range(len(seqs))]
            ours = steps.step(step_tokens, positions, active=active)
            for b in active:
                alone = model(torch.tensor([seqs[b][at[b]]]), [Segment(ref_caches[b], at[b], 1)],
                              last_only=True)
                torch.testing.assert_close(ours[b], alone[0], rtol=1e-5, atol=1e-5)
                at[b] += 1
        assert relative_error(ours[0], ours[1]) > 0.01  # the rows are different sequences


def test_the_engine_routes_decode_only_steps_through_graphs(tiny_q8, monkeypatch):
    """The server engine's graph path on the CPU, the graphs uncaptured: a sequence alone steps
    through its slot's, several through the set over all slots (idle slots at the last row),
    steps with prompt chunks stay eager; the tokens are those of LLM.generate."""
    from tandem.runtime.engine import Engine
    from tandem.runtime.sampler import SamplingParams

    prompts = [tokens(PROMPT), tokens(PROMPT + 4)[::-1][:PROMPT + 2], tokens(PROMPT + 9)[5:]]
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    with tandem.LLM(tiny_q8, rules=CPU_RULES, ctx_size=48, sequences=3) as llm:
        expected = [llm.generate(p, 12) for p in prompts]
        made = []

        def uncaptured(*sequences):
            made.append(len(sequences))
            return DecodeGraphs(llm.model, sequences, torch.device("cpu"), capture=False, bucket=16)

        monkeypatch.setattr(llm, "decodes_in_graphs", True)
        monkeypatch.setattr(llm, "decode_graphs_for", uncaptured)
        engine = Engine(llm, max_batch=3)
        try:
            alone = list(engine.submit(prompts[0], greedy).tokens(60))
            two = [engine.submit(p, greedy) for p in prompts[1:]]  # two of the three slots
            together = [list(r.tokens(60)) for r in two]
        finally:
            engine.close()
    assert made[0] == 1 and 3 in made  # a slot's own graphs, then the set over all three
    for ours, reference in zip([alone, *together], expected, strict=True):
        assert ours == reference


def test_buckets_double_up_to_the_context():
    assert decode_graphs.bucket_lengths(512, 4096) == [512, 1024, 2048, 4096]
    assert decode_graphs.bucket_lengths(512, 3000) == [512, 1024, 2048, 3000]
    assert decode_graphs.bucket_lengths(512, 512) == [512]
    assert decode_graphs.bucket_lengths(512, 100) == [100]


def test_cpu_models_keep_eager_decode(tiny_q8):
    with tandem.LLM(tiny_q8, rules=CPU_RULES, ctx_size=48) as llm:
        assert not decode_graphs.supported(llm.model)
        llm.generate(tokens(PROMPT), 3)
        assert not llm._graphs and llm.decode_graphs_for(llm._cache) is None


# float32 on the GPU: bfloat16 outputs round differently under capture (cuBLAS picks other
# GEMV splits there), which a tiny random model amplifies to ~0.5% of its logits; a wrong
# buffer or mask moves them by tens of percent.
GPU_F32_RULES = [Rule(r"ffn_(gate|up|down)_exps\.", "cpu", "cpu"), Rule(r"^token_embd\.", "cpu", "ggml"),
                 Rule(".", "cuda", "torch", "float32")]


@pytest.mark.cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["eager-pieces", "compiled-pieces"])
def test_cuda_graph_steps_equal_the_eager_forward(tiny_q8, compiled):
    sequence = tokens(PROMPT + STEPS)
    pieces = StepPieces.compiled() if compiled else StepPieces()
    with tandem.LLM(tiny_q8, rules=GPU_F32_RULES, ctx_size=48) as llm:
        assert decode_graphs.supported(llm.model)
        eager = eager_steps(llm, sequence)
        ours = stepwise(llm, sequence, capture=True, bucket=16, pieces=pieces)
    assert relative_error(ours, eager) < 1e-3  # float32 sums in other orders (measured 2.6e-4)
    assert top1_agreement(ours, eager) > 0.95


@pytest.mark.cuda
def test_pieces_that_fail_to_compile_give_way_to_eager_ones(tiny_q8, caplog):
    """A compiled piece that fails (no compiler, say) in the warm-up before the first capture:
    a warning, and every graph captured again from the eager pieces."""
    def no_compiler(*args):
        raise RuntimeError("no C compiler found")

    sequence = tokens(PROMPT + STEPS)
    with tandem.LLM(tiny_q8, rules=GPU_F32_RULES, ctx_size=48) as llm:
        eager = eager_steps(llm, sequence)
        with caplog.at_level("WARNING"):
            ours = stepwise(llm, sequence, capture=True, bucket=16, pieces=StepPieces(attention=no_compiler))
    assert "compiling the decode steps' pieces failed (no C compiler found)" in caplog.text
    assert relative_error(ours, eager) < 1e-3


@pytest.mark.cuda
def test_generate_with_and_without_graphs_agree(tiny_q8):
    prompt = tokens(PROMPT)
    with tandem.LLM(tiny_q8, ctx_size=128) as llm:
        with_graphs = llm.generate(prompt, 40)
        assert llm._graphs
    with tandem.LLM(tiny_q8, ctx_size=128, cuda_graphs=False) as llm:
        eager = llm.generate(prompt, 40)
        assert not llm._graphs
    same = sum(a == b for a, b in zip(with_graphs, eager, strict=True))
    assert same >= 36, f"{same}/40 tokens agree"


@pytest.mark.cuda
def test_the_engine_decodes_a_lone_sequence_through_its_slots_graphs(tiny_q8):
    """The server's engine replays a slot's graphs while one sequence decodes alone and the
    graphs over all slots while several do; the tokens agree with LLM.generate either way."""
    from tandem.runtime.engine import Engine
    from tandem.runtime.sampler import SamplingParams

    short, long = tokens(PROMPT), tokens(PROMPT + 6)[::-1]
    with tandem.LLM(tiny_q8, ctx_size=128) as llm:
        expected = {"short": llm.generate(short, 10), "long": llm.generate(long, 40)}
        engine = Engine(llm, max_batch=2)
        try:
            greedy = {n: SamplingParams(temperature=0, max_new_tokens=n) for n in (10, 40)}
            lone = list(engine.submit(long, greedy[40]).tokens(120))
            assert any(engine.slot_graphs), "no step went through graphs"
            # together: steps of two until the short one ends, then the long one alone again
            a, b = engine.submit(short, greedy[10]), engine.submit(long, greedy[40])
            together = {"short": list(a.tokens(120)), "long": list(b.tokens(120))}
            assert engine.batch_graphs is not None, "no step of two went through graphs"
        finally:
            engine.close()
    for ours, reference in ((lone, expected["long"]), (together["short"], expected["short"]),
                            (together["long"], expected["long"])):
        same = sum(x == y for x, y in zip(ours, reference, strict=False))
        assert same >= 0.9 * len(reference), f"{same}/{len(reference)} tokens agree"
