"""Long batches with the routed experts streamed to a device (kernels.streamed) give the logits
of the CPU kernels: the reference is the same model with every batch on the CPU experts."""

from __future__ import annotations

import pytest
import torch

import tandem
from expert_checks import cpu_experts
from logit_checks import relative_error, top1_agreement
from tandem.errors import TandemError
from tandem.kernels.streamed import ExpertStreamer
from tandem.placement.rules import Rule

CPU_RULES = [Rule(r"ffn_(gate|up|down)_exps\.", "cpu", "cpu"), Rule(r"^token_embd\.", "cpu", "ggml"),
             Rule(".", "cpu", "torch")]
# float32 for the rest on the GPU: a tiny random model amplifies bf16 rounding there to ~7% of
# its logits, which would hide what this compares (the experts' path).
GPU_F32_RULES = [Rule(r"ffn_(gate|up|down)_exps\.", "cpu", "cpu"), Rule(r"^token_embd\.", "cpu", "ggml"),
                 Rule(".", "cuda", "torch", "float32")]


def tokens(n: int) -> list[int]:
    return torch.randint(1, 500, (n,), generator=torch.Generator().manual_seed(5)).tolist()


def tiny_iq1_s(tmp_path) -> tuple:
    """A tiny R1-shaped file with UD-IQ1_S experts (tandem's own CPU kernels), a prompt, and its
    12 greedy tokens decoded on the CPU experts alone (no GPU share): the reference."""
    from tandem.bench import synth

    path = tmp_path / "iq1.gguf"
    synth.write(synth.plan("tiny", "ud-iq1_s"), path)
    prompt = tokens(8)
    with tandem.LLM(path, ctx_size=64, gpu_expert_share=0) as llm:
        assert llm.gpu_share is None
        reference = llm.generate(prompt, 12)
    return path, prompt, reference


def test_streamed_prefill_matches_the_cpu_kernels(tiny_q8):
    prompt = tokens(40)
    with tandem.LLM(tiny_q8, rules=CPU_RULES, ctx_size=64) as llm:
        experts = cpu_experts(llm)
        assert experts and all(e.streamer is None for e in experts)  # no GPU: nothing streams
        reference = llm.logits(prompt)
        streamer = ExpertStreamer("cpu", min_tokens=16, experts_per_chunk=3)
        for e in experts:
            e.streamer = streamer
        ours = llm.logits(prompt)
        short = llm.logits(prompt[:8])  # below min_tokens: the CPU kernels again
    assert relative_error(ours, reference) < 0.03  # bf16 weights and activations
    assert top1_agreement(ours, reference) > 0.9
    torch.testing.assert_close(short, reference[:8], rtol=1e-4, atol=1e-4)


def test_negative_threshold_is_refused(tiny_q8):
    with pytest.raises(TandemError, match="gpu_experts_from must be a token count"):
        tandem.LLM(tiny_q8, ctx_size=64, gpu_experts_from=-1)


@pytest.mark.parametrize("bad", [-1, float("inf"), "big"])
def test_bad_gpu_expert_cache_is_refused(tiny_q8, bad):
    with pytest.raises(TandemError, match=rf"gpu_expert_cache must be a size in GiB >= 0, got {bad!r}"):
        tandem.LLM(tiny_q8, ctx_size=64, gpu_expert_share="auto", gpu_expert_cache=bad)


def test_an_expert_cache_without_the_share_is_refused(tiny_q8):
    with pytest.raises(TandemError, match="keeps experts in VRAM for the GPU expert share"):
        tandem.LLM(tiny_q8, ctx_size=64, gpu_expert_share=0, gpu_expert_cache=1)


@pytest.mark.parametrize("bad", [1.5, -0.1, "half"])
def test_bad_gpu_expert_share_is_refused(tiny_q8, bad):
    want = rf"gpu_expert_share must be 'auto' or a fraction in \[0, 1\] \(0: off\), got {bad!r}"
    with pytest.raises(TandemError, match=want):
        tandem.LLM(tiny_q8, ctx_size=64, gpu_expert_share=bad)



@pytest.mark.cuda
def test_gpu_streamed_prefill_matches_the_cpu_kernels(tiny_q8):
    prompt = tokens(100)
    with tandem.LLM(tiny_q8, rules=GPU_F32_RULES, ctx_size=128, gpu_experts_from=0) as llm:
        assert all(e.streamer is None for e in cpu_experts(llm))
        assert llm.prefill_chunk == 2048  # experts read in place: long passes either way
        reference = llm.logits(prompt)
    with tandem.LLM(tiny_q8, rules=GPU_F32_RULES, ctx_size=128, gpu_experts_from=32) as llm:
        assert llm.prefill_chunk == 2048
        assert all(e.streamer is not None and e.streamer.device.type == "cuda" for e in cpu_experts(llm))
        ours = llm.logits(prompt)
        generated = llm.generate(prompt, 8)  # decode steps (one token) stay on the CPU experts
    assert relative_error(ours, reference) < 0.03
    assert top1_agreement(ours, reference) > 0.9
    assert len(generated) == 8


def test_llm_wires_a_streamer_plans_its_memory_and_prefills_in_long_passes(tiny_q8, monkeypatch):
    """What LLM does when it finds a GPU, with the streamer on the CPU instead: every MoE gets
    it, the memory plan carries its workspace, passes grow to 2048 tokens, logits hold."""
    from tandem.runtime import llm as llm_module

    with tandem.LLM(tiny_q8, rules=CPU_RULES, ctx_size=64) as llm:
        reference = llm.logits(tokens(40))
    monkeypatch.setattr(llm_module, "_streamer", lambda devices, m: ExpertStreamer("cpu", 16))
    with tandem.LLM(tiny_q8, rules=CPU_RULES, ctx_size=64) as llm:
        assert all(e.streamer is not None for e in cpu_experts(llm))
        assert llm.prefill_chunk == 2048 and llm.gpu_experts_from == 16
        assert llm.memory.workspace["cpu"] > 0
        ours = llm.logits(tokens(40))
    assert relative_error(ours, reference) < 0.03


@pytest.mark.cuda
def test_decode_shares_iq1_s_experts_with_the_gpu_and_keeps_the_cpu_logits(tmp_path):
    """An R1-shaped tiny model with IQ1_S/IQ2_XXS experts (tandem's own CPU kernels): every MoE
    gets the LLM's GPU share, decode steps use it (the balance moves), and greedy tokens agree
    with decode on the CPU experts alone."""
    path, prompt, reference = tiny_iq1_s(tmp_path)
    with tandem.LLM(path, ctx_size=64, gpu_expert_share="auto") as llm:
        assert llm.gpu_share is not None and llm.gpu_share.wait(60), llm.gpu_share.skipped
        experts = cpu_experts(llm)
        assert experts and all(e.share is llm.gpu_share for e in experts)
        ours = llm.generate(prompt, 12)
        assert any(e.balance.share != 0.5 for e in experts)  # shared steps ran and were balanced
    assert sum(a == b for a, b in zip(ours, reference, strict=True)) >= 10
    with tandem.LLM(path, ctx_size=256, gpu_expert_share="auto", gpu_expert_cache=0.05) as llm:
        assert llm.gpu_share.wait(120) and llm.gpu_share.cached_bytes > 0, llm.gpu_share.skipped
        for _ in range(8):  # ~88 decode steps: past two refreshes, experts now come from VRAM
            cached = llm.generate(prompt, 12)
        assert any(llm.gpu_share.resident(e.gate) for e in cpu_experts(llm))
    assert sum(a == b for a, b in zip(cached, reference, strict=True)) >= 10


@pytest.mark.cuda
def test_decode_with_early_cpu_parts_keeps_the_cpu_tokens(tmp_path, monkeypatch):
    """Early CPU parts (TANDEM_SHARE_EARLY, the default) under the captured decode graphs: each
    MoE's CPU part is posted before its segment is done (the runner polls the segment's event),
    the split fixed by count; the balance still moves and greedy tokens agree with the CPU
    experts alone."""
    path, prompt, reference = tiny_iq1_s(tmp_path)
    monkeypatch.delenv("TANDEM_SHARE_EARLY", raising=False)
    with tandem.LLM(path, ctx_size=64, gpu_expert_share="auto") as llm:
        assert llm.gpu_share.wait(60) and llm.gpu_share.early, llm.gpu_share.skipped
        ours = llm.generate(prompt, 12)
        experts = cpu_experts(llm)
        assert llm._graphs is not None and all(e._early_buffer is not None for e in experts)
        assert any(e.balance.share != 0.5 for e in experts)
    assert sum(a == b for a, b in zip(ours, reference, strict=True)) >= 10


@pytest.mark.cuda
def test_one_tokens_share_graphs_captured_ahead_serve_decode(tmp_path, monkeypatch):
    """TANDEM_SHARE_PRECAPTURE=1: every one-token graph (each expert count of each half) is
    captured before the share starts; decode captures none of them again, and greedy tokens
    agree with the CPU experts alone."""
    path, prompt, reference = tiny_iq1_s(tmp_path)
    monkeypatch.setenv("TANDEM_SHARE_PRECAPTURE", "1")
    with tandem.LLM(path, ctx_size=64, gpu_expert_share="auto") as llm:
        share = llm.gpu_share
        assert share.wait(60) and share.precapture, share.skipped

        def one_token_graphs() -> set:
            return {key for key in share._graphs if key[1] is False}
        ahead = one_token_graphs()
        assert len(ahead) == 2 * len(share._counts(False))  # one mix of types in this file
        ours = llm.generate(prompt, 12)
        assert one_token_graphs() == ahead
    assert sum(a == b for a, b in zip(ours, reference, strict=True)) >= 10


@pytest.mark.cuda
def test_decode_with_next_layer_prefetch_keeps_the_cpu_tokens(tmp_path, monkeypatch):
    """TANDEM_SHARE_PREFETCH under the captured decode graphs: the segments' predictions reach
    the host, the share copies them ahead, and greedy tokens agree with the CPU experts alone."""
    path, prompt, reference = tiny_iq1_s(tmp_path)
    monkeypatch.setenv("TANDEM_SHARE_PREFETCH", "2")
    with tandem.LLM(path, ctx_size=64, gpu_expert_share="auto") as llm:
        assert llm.gpu_share.wait(60) and llm.gpu_share.prefetch_rows == 2, llm.gpu_share.skipped
        ours = llm.generate(prompt, 12)
        assert llm._graphs is not None and any("ahead" in cut.host for cut in llm._graphs.cuts)
        assert llm.gpu_share._ahead is not None and llm.gpu_share._ahead.row_of
        assert llm.gpu_share.counts["from_prefetch"] > 0  # early calls too take them
    assert sum(a == b for a, b in zip(ours, reference, strict=True)) >= 10


@pytest.mark.cuda
@pytest.mark.parametrize("setting", [None, "0", "3"])
def test_a_gpu_share_shrinks_torchs_cpu_team(tmp_path, monkeypatch, setting):
    """With a GPU share torch keeps TORCH_THREADS_WITH_SHARE CPU threads (so that libgomp does
    not count more threads than CPUs once the runner's team starts); 0 leaves torch's count."""
    from tandem.bench import synth
    from tandem.kernels.gpu_share import TORCH_THREADS_WITH_SHARE

    path = tmp_path / "iq1.gguf"
    synth.write(synth.plan("tiny", "ud-iq1_s"), path)
    if setting is not None:
        monkeypatch.setenv("TANDEM_SHARE_TORCH_THREADS", setting)
    before = 5  # neither the default nor the setting
    want = {None: TORCH_THREADS_WITH_SHARE, "0": before, "3": 3}[setting]
    original = torch.get_num_threads()
    torch.set_num_threads(before)
    try:
        with tandem.LLM(path, ctx_size=64, gpu_expert_share="auto") as llm:
            assert llm.gpu_share is not None
            assert torch.get_num_threads() == want
        torch.set_num_threads(before)
        with tandem.LLM(path, ctx_size=64, gpu_expert_share=0) as llm:  # no share: left alone
            assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(original)
