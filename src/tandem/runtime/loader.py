"""Build the torch model from a GGUF file and a placement: the only place that turns file
tensors into module weights (dequantized on their device, or left in the mmap for ggml)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from tandem.errors import GGUFError
from tandem.gguf.config import DeepSeek2Config
from tandem.gguf.model import GGUFModel
from tandem.kernels.cpu import CpuKernels
from tandem.kernels.embedding import DenseEmbedding, QuantEmbedding
from tandem.kernels.experts import GgmlExperts, TorchExperts
from tandem.kernels.tensors import QuantTensor
from tandem.models import deepseek_v3 as ds
from tandem.placement.rules import Placement

log = logging.getLogger(__name__)


def check_tensors(model: GGUFModel, expected: list[tuple[str, tuple[int, ...]]]) -> None:
    """Every tensor the architecture needs is there with the right shape."""
    missing = [name for name, _ in expected if name not in model.tensors]
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise GGUFError(f"{model.path}: missing tensors {', '.join(missing[:8])}{more}")
    for name, shape in expected:
        got = model.tensors[name].shape
        if got != shape:
            raise GGUFError(f"{model.path}: tensor {name!r} has shape {list(got)}, the config "
                            f"(metadata) implies {list(shape)}")


class WeightLoader:
    def __init__(self, model: GGUFModel, placements: dict[str, Placement],
                 kernels: CpuKernels | None, advance: Callable[[int], None] | None = None):
        self.model, self.placements, self.kernels = model, placements, kernels
        self.advance = advance or (lambda n: None)

    def dense(self, name: str) -> torch.Tensor:
        p = self.placements[name]
        weight = self.model.dequantize(name).to(p.device, p.dtype)
        self.advance(self.model.tensors[name].n_bytes)
        return weight

    def linear(self, name: str) -> ds.Linear:
        return ds.Linear(self.dense(name))

    def norm(self, name: str, eps: float) -> ds.RMSNorm:
        return ds.RMSNorm(self.dense(name), eps)

    def embedding(self, name: str):
        if self.placements[name].kernel == "ggml":
            self.advance(self.model.tensors[name].n_bytes)
            return QuantEmbedding(QuantTensor.from_gguf(self.model, name))
        return DenseEmbedding(self.dense(name))

    def experts(self, prefix: str):
        names = [f"{prefix}.ffn_{part}_exps.weight" for part in ("gate", "up", "down")]
        kernels = {self.placements[n].kernel for n in names}
        if kernels == {"ggml"}:
            for n in names:
                self.advance(self.model.tensors[n].n_bytes)
            return GgmlExperts(self.kernels, *(QuantTensor.from_gguf(self.model, n) for n in names))
        if kernels == {"torch"}:
            return TorchExperts(*(self.dense(n) for n in names))
        raise GGUFError(f"{prefix}: gate, up and down experts must share one kernel, got "
                        f"{sorted(kernels)}; give the three *_exps tensors the same rule")


def build_deepseek(model: GGUFModel, c: DeepSeek2Config, loader: WeightLoader,
                   devices: list[torch.device]) -> ds.DeepseekV3:
    """The model for config `c`, whose n_group/topk_group must be resolved."""
    eps = c.rms_norm_eps
    blocks = []
    for i in range(c.n_layers):
        b = f"blk.{i}"
        rope = ds.Rope(c, devices[i])
        if c.q_lora_rank:
            q = ds.LoraQuery(loader.linear(f"{b}.attn_q_a.weight"),
                             loader.norm(f"{b}.attn_q_a_norm.weight", eps),
                             loader.linear(f"{b}.attn_q_b.weight"))
        else:
            q = loader.linear(f"{b}.attn_q.weight")
        w_k, w_v = _absorbed_kv_b(model, loader, b, c)
        attn = ds.MLAttention(c, q, loader.linear(f"{b}.attn_kv_a_mqa.weight"),
                              loader.norm(f"{b}.attn_kv_a_norm.weight", eps), w_k, w_v,
                              loader.linear(f"{b}.attn_output.weight"), rope)
        if i < c.n_dense_layers:
            ffn = ds.GatedMLP(*(loader.linear(f"{b}.ffn_{p}.weight") for p in ("gate", "up", "down")))
        else:
            shared = None
            if c.n_shared_experts:
                shared = ds.GatedMLP(*(loader.linear(f"{b}.ffn_{p}_shexp.weight")
                                       for p in ("gate", "up", "down")))
            bias_name = f"{b}.exp_probs_b.bias"
            bias = loader.dense(bias_name) if bias_name in model.tensors else None
            ffn = ds.MoE(c, loader.dense(f"{b}.ffn_gate_inp.weight"), bias, loader.experts(b),
                         shared)
        blocks.append(ds.Block(loader.norm(f"{b}.attn_norm.weight", eps), attn,
                               loader.norm(f"{b}.ffn_norm.weight", eps), ffn))
    return ds.DeepseekV3(c, loader.embedding("token_embd.weight"), blocks,
                         loader.norm("output_norm.weight", eps), loader.linear("output.weight"))


def _absorbed_kv_b(model: GGUFModel, loader: WeightLoader, b: str, c: DeepSeek2Config):
    """W_k [H, n, r] and W_v [H, v, r] from either attn_kv_b or attn_k_b + attn_v_b."""
    if f"{b}.attn_kv_b.weight" in model.tensors:
        kv_b = loader.dense(f"{b}.attn_kv_b.weight").view(c.n_heads, -1, c.kv_lora_rank)
        return (kv_b[:, : c.qk_nope_head_dim].contiguous(),
                kv_b[:, c.qk_nope_head_dim :].contiguous())
    k_b = loader.dense(f"{b}.attn_k_b.weight")  # [H, r, n]
    return k_b.transpose(1, 2).contiguous(), loader.dense(f"{b}.attn_v_b.weight")
