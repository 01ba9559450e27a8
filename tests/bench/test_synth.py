"""Synthetic model files: recipes, random valid blocks, splits."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

import tandem
from tandem.bench import presets, synth
from tandem.bench.random_blocks import FP16_SCALES, random_blocks
from tandem.errors import TandemError
from tandem.gguf.types import block_bytes, block_size
from tandem.kernels.dequant import dequantize
from tandem.models import deepseek_v3

RANDOM_TYPES = [*FP16_SCALES, T.IQ1_M, T.F32, T.F16, T.BF16]


@pytest.mark.parametrize("t", RANDOM_TYPES, ids=lambda t: t.name)
def test_random_blocks_are_valid(t, rng):
    blocks = random_blocks(t, 256, rng).reshape(-1)
    n = 256 * block_size(t)
    ref = quants.dequantize(blocks, t).reshape(-1).astype(np.float32)
    assert np.isfinite(ref).all()
    assert 0 < np.abs(ref).max() < 100
    assert ref.std() > 0
    np.testing.assert_array_equal(dequantize(blocks, t, (n,)).numpy(), ref)
    # Centred like trained weights (a lean of every weight one way makes a synthetic model's
    # activations explode): the mean is small against the spread.
    assert abs(ref.mean()) < 0.1 * ref.std(), f"{t.name}: mean {ref.mean():.3g}, std {ref.std():.3g}"


def test_ud_iq1_s_recipe_types(tmp_path):
    path = tmp_path / "ud.gguf"
    synth.write(synth.plan("tiny", "ud-iq1_s"), path, fill="random")
    types = {n: t.ggml_type for n, t in tandem.open_gguf(path).tensors.items()}
    assert types["blk.1.ffn_gate_exps.weight"] == T.IQ1_S
    assert types["blk.1.ffn_up_exps.weight"] == T.IQ1_S
    assert types["blk.1.ffn_down_exps.weight"] == T.IQ2_XXS
    assert types["blk.1.ffn_gate_inp.weight"] == T.F32
    assert types["blk.0.attn_q_a.weight"] == T.Q4_K
    assert types["blk.0.attn_kv_b.weight"] == T.Q6_K
    assert types["blk.0.ffn_down.weight"] == T.Q6_K
    assert types["output.weight"] == T.Q6_K
    assert all(types[n] == T.F32 for n in types if "norm" in n or n.endswith(".bias"))


def test_incompatible_rows_fall_back(tmp_path):
    # attn_k_b rows are qk_nope_head_dim = 32 long: no 256-blocks fit, Q8_0 does.
    planned = synth.plan("tiny", "q4_k_m", split_kv_b=True)
    types = {name: t for name, _, t in planned.tensors}
    assert types["blk.0.attn_k_b.weight"] == T.Q8_0
    assert types["blk.0.attn_v_b.weight"] == T.Q6_K


def test_type_overrides_come_first():
    planned = synth.plan("tiny", "q4_k_m", overrides=["ffn_down_exps=q2_k", r"^output\.=IQ4_XS"])
    types = {name: t for name, _, t in planned.tensors}
    assert types["blk.2.ffn_down_exps.weight"] == T.Q2_K
    assert types["output.weight"] == T.IQ4_XS
    with pytest.raises(TandemError, match="unknown ggml type name 'q9'"):
        synth.plan("tiny", "q4_k_m", overrides=["x=q9"])
    with pytest.raises(TandemError, match="REGEX=TYPE"):
        synth.plan("tiny", "q4_k_m", overrides=["nonsense"])


def test_quantized_fill_round_trips_through_ggml(tmp_path):
    path = tmp_path / "q.gguf"
    synth.write(synth.plan("tiny", "q4_k_m"), path, fill="quantized", seed=3)
    model = tandem.open_gguf(path)
    w = model.dequantize("blk.0.attn_q_a.weight")
    assert 0.01 < w.std().item() < 0.04  # random normal * 0.02, through Q4_K
    norm = model.dequantize("blk.0.attn_norm.weight")
    assert abs(norm.mean().item() - 1.0) < 0.05


def test_random_fill_keeps_norms_near_one(tmp_path):
    path = tmp_path / "r.gguf"
    synth.write(synth.plan("tiny", "ud-iq1_s"), path, fill="random", seed=3)
    model = tandem.open_gguf(path)
    for name in ("blk.0.attn_norm.weight", "blk.1.ffn_norm.weight", "output_norm.weight"):
        assert abs(model.dequantize(name).mean().item() - 1.0) < 0.05, name


def test_random_fill_routes_tokens_over_many_experts(tmp_path, monkeypatch):
    """A randomly filled file routes each token to its own experts, nearer a trained model than
    to the few experts whose router bias is largest: what expert caches, prefetching and
    batched decode are measured on. 64 experts, 8 per token, 64 random tokens."""
    shape = replace(presets.TINY, n_embd=512, n_expert=64, n_expert_used=8, n_group=8, topk_group=4)
    monkeypatch.setitem(presets.PRESETS, "routing", shape)
    path = tmp_path / "routing.gguf"
    synth.write(synth.plan("routing", "ud-iq1_s", n_layers=3, n_dense_layers=1), path, fill="random")
    picks = []
    choose = deepseek_v3.MoE.choose

    def recorded(self, x):
        ids, weights = choose(self, x)
        picks.append(ids.flatten())
        return ids, weights

    monkeypatch.setattr(deepseek_v3.MoE, "choose", recorded)
    with tandem.LLM(path, ctx_size=128) as llm:
        tokens = torch.randint(10, shape.n_vocab - 10, (64,), generator=torch.Generator().manual_seed(0))
        llm._forward(tokens, 0)
    assert len(picks) == 2  # one per MoE layer
    for ids in picks:
        counts = torch.bincount(ids, minlength=64).sort(descending=True).values
        # with random norms (std 0.02) the router's bias decided: 20 of 64 experts, the same
        # few for every token; here 40-43 (a uniform choice would reach ~64)
        assert int((counts > 0).sum()) >= 36, counts.tolist()
        assert int(counts[:8].sum()) < 0.7 * ids.numel(), counts.tolist()


def test_r1_plan_has_full_dimensions():
    planned = synth.plan("r1", "ud-iq1_s", n_layers=5)
    shapes = {name: s for name, s, _ in planned.tensors}
    assert shapes["blk.4.ffn_gate_exps.weight"] == (256, 2048, 7168)
    assert shapes["blk.4.ffn_down_exps.weight"] == (256, 7168, 2048)
    assert shapes["blk.0.attn_kv_b.weight"] == (128 * 256, 512)
    assert shapes["token_embd.weight"] == (129280, 7168)
    assert "blk.2.ffn_gate_exps.weight" not in shapes  # 3 dense layers first
    # Expert bytes of one MoE layer: IQ1_S is 50 bytes per 256 weights, IQ2_XXS 66.
    experts = sum(synth.tensor_bytes(t, s) for n, s, t in planned.tensors
                  if n.startswith("blk.4.") and "_exps" in n)
    assert experts == 256 * 2048 * 7168 * (50 + 50 + 66) // 256


def test_bad_preset_and_layers():
    with pytest.raises(TandemError, match="unknown preset 'huge'"):
        presets.shape_for("huge")
    with pytest.raises(TandemError, match="dense layers <= layers"):
        presets.shape_for("tiny", n_layers=2, n_dense_layers=3)


def test_pool_fill_repeats_random_blocks_in_the_routed_experts_only(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "POOL_BYTES", 4 * 1024)  # a pool far smaller than an expert tensor
    path = tmp_path / "pool.gguf"
    synth.write(synth.plan("tiny", "ud-iq1_s"), path, fill="pool", seed=3)
    model = tandem.open_gguf(path)

    def blocks(name):
        info = model.tensors[name]
        size = block_bytes(info.ggml_type)
        return model.raw(name).reshape(-1)[: info.n_bytes // size * size].reshape(-1, size)

    gate = blocks("blk.1.ffn_gate_exps.weight")  # IQ1_S: 50-byte blocks, 81 in the pool
    period = 4 * 1024 // gate.shape[1]
    assert len(gate) > 2 * period
    assert np.array_equal(gate[period:2 * period], gate[:period])  # the pool, again
    assert len(np.unique(gate[:period], axis=0)) == period  # random blocks within it
    assert np.isfinite(model.dequantize("blk.1.ffn_gate_exps.weight").numpy()).all()
    dense = blocks("blk.0.ffn_up.weight")  # not a routed expert: random throughout
    assert len(dense) > period and len(np.unique(dense, axis=0)) == len(dense)
    with pytest.raises(TandemError, match="fill must be one of auto, random, pool, quantized, got 'zeros'"):
        synth.write(synth.plan("tiny", "ud-iq1_s"), tmp_path / "x.gguf", fill="zeros")
