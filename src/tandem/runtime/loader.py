"""Build the torch model from a GGUF file and a placement: the only place that turns file
tensors into module weights (dequantized on their device, or left in the mmap for ggml)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch

from tandem.errors import GGUFError
from tandem.gguf.model import GGUFModel
from tandem.kernels.cpu import CpuKernels
from tandem.kernels.embedding import DenseEmbedding, QuantEmbedding
from tandem.kernels.experts import CpuExperts, TorchExperts
from tandem.kernels.gpu_share import GpuShare, ShareBalance
from tandem.kernels.quant_linear import QuantLinear
from tandem.kernels.streamed import ExpertStreamer
from tandem.kernels.tensors import QuantTensor
from tandem.models.layers import GatedMLP, Linear, RMSNorm
from tandem.placement.rules import IN_PLACE_KERNELS, Placement, kept_quantized

log = logging.getLogger(__name__)


def check_tensors(model: GGUFModel, expected: list[tuple[str, tuple[int, ...]]],
                  aliases: dict[str, str] | None = None) -> None:
    """Every tensor the architecture needs is there with the right shape."""
    aliases = aliases or {}
    stored = [(aliases.get(name, name), shape) for name, shape in expected]
    missing = [name for name, _ in stored if name not in model.tensors]
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise GGUFError(f"{model.path}: missing tensors {', '.join(missing[:8])}{more}")
    for name, shape in stored:
        got = model.tensors[name].shape
        if got != shape:
            raise GGUFError(f"{model.path}: tensor {name!r} has shape {list(got)}, the config "
                            f"(metadata) implies {list(shape)}")


class WeightLoader:
    """Module weights by tensor name, each as its placement says. `aliases` name tensors that
    the file stores under another name (a tied output head reads token_embd). `streamer` takes
    long batches of the CPU experts of blocks whose router is on its device; `share` computes
    part of their short batches there."""

    def __init__(self, model: GGUFModel, placements: dict[str, Placement],
                 kernels: CpuKernels | None, advance: Callable[[int], None] | None = None,
                 aliases: dict[str, str] | None = None, streamer: ExpertStreamer | None = None,
                 share: GpuShare | None = None, share_fraction: float | None = None):
        self.model, self.placements, self.kernels = model, placements, kernels
        self.advance = advance or (lambda n: None)
        self.aliases = aliases or {}
        self.streamer = streamer
        self.share = share
        self.share_fraction = share_fraction  # fixed, or None: balanced per layer from 0.5
        self.in_place: list[QuantTensor] = []  # tensors the CPU reads from the mapped file

    def _in_place(self, name: str) -> QuantTensor:
        tensor = QuantTensor.from_gguf(self.model, name)
        self.in_place.append(tensor)
        return tensor

    def dense(self, name: str) -> torch.Tensor:
        p = self.placements[name]
        stored = self.aliases.get(name, name)
        weight = self.model.dequantize(stored).to(p.device, p.dtype)
        self.advance(self.model.tensors[stored].n_bytes)
        return weight

    def linear(self, name: str) -> Linear | QuantLinear:
        p, stored = self.placements[name], self.aliases.get(name, name)
        info = self.model.tensors[stored]
        if kept_quantized(name, info.ggml_type, p):  # the file's bytes on the device
            with warnings.catch_warnings():  # a read-only mapping: torch warns; only read
                warnings.simplefilter("ignore", UserWarning)
                raw = torch.from_numpy(self.model.raw(stored).reshape(-1)).to(p.device)
            self.advance(info.n_bytes)
            return QuantLinear(raw, info.ggml_type, tuple(info.shape))
        return Linear(self.dense(name))

    def norm(self, name: str, eps: float) -> RMSNorm:
        return RMSNorm(self.dense(name), eps)

    def mlp(self, prefix: str, suffix: str = "", activation: str = "silu") -> GatedMLP:
        """ffn_gate/up/down{suffix} of block `prefix` (suffix "_shexp": shared experts)."""
        return GatedMLP(*(self.linear(f"{prefix}.ffn_{p}{suffix}.weight") for p in ("gate", "up", "down")),
                        activation=activation)

    def embedding(self, name: str):
        if self.placements[name].kernel in IN_PLACE_KERNELS:
            self.advance(self.model.tensors[name].n_bytes)
            return QuantEmbedding(self._in_place(name))
        return DenseEmbedding(self.dense(name))

    def experts(self, prefix: str):
        names = [f"{prefix}.ffn_{part}_exps.weight" for part in ("gate", "up", "down")]
        kernels = {self.placements[n].kernel for n in names}
        if len(kernels) == 1 and kernels <= set(IN_PLACE_KERNELS):
            for n in names:
                self.advance(self.model.tensors[n].n_bytes)
            router = self.placements.get(f"{prefix}.ffn_gate_inp.weight")
            streamer, share = self.streamer, self.share
            if streamer is not None and (router is None or router.device != streamer.device):
                streamer = None
            if share is not None and (router is None or not share.serves(router.device)):
                share = None
            fixed = self.share_fraction is not None
            balance = ShareBalance(self.share_fraction if fixed else 0.5, fixed=fixed)
            return CpuExperts(self.kernels, *(self._in_place(n) for n in names),
                              own_kernels=kernels == {"cpu"}, streamer=streamer, share=share,
                              balance=balance)
        if kernels == {"torch"}:
            return TorchExperts(*(self.dense(n) for n in names))
        raise GGUFError(f"{prefix}: gate, up and down experts must share one kernel, got "
                        f"{sorted(kernels)}; give the three *_exps tensors the same rule")
