"""The most used routed experts of each MoE layer, kept in spare VRAM for the GPU share.

With a share of each decode step's experts on the GPU (kernels.gpu_share), every such expert's
bytes cross PCIe when it is chosen: ~0.18 ms per UD-IQ1_S expert at the GPU machine's 53 GB/s.
Experts are not chosen evenly, so VRAM the model leaves free can hold the most used ones: the
share then copies those within VRAM (microseconds) and takes them before any other. Usage is
counted online per layer and halved at every refresh, so the set follows the text; a refresh
(every REFRESH_EVERY calls of a layer) swaps in at most SWAPS_PER_REFRESH experts, so PCIe
stays free for the share's own copies.

Synthetic files route nearly the same few experts every step (random weights), so a cache looks
far better on them than it will on a real model: measure it on real routing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from tandem.kernels.tensors import QuantTensor

REFRESH_EVERY = 32  # calls of a layer between two refreshes of its cached set
SWAPS_PER_REFRESH = 2  # experts copied in per refresh at most


class LayerCache:
    """Up to `capacity` experts of one layer (gate, up, down bytes as stored) on `device`."""

    def __init__(self, tensors: Sequence[QuantTensor], capacity: int, device: torch.device):
        self.tensors = tuple(tensors)
        self.capacity = capacity
        self.rows = [torch.zeros(capacity, w.expert_bytes(), dtype=torch.uint8, device=device)
                     for w in self.tensors]
        self.row_of: dict[int, int] = {}  # expert -> its row
        self.counts = np.zeros(self.tensors[0].shape[0])  # uses, halved at each refresh
        self.calls = 0

    def note(self, experts: Iterable[int]) -> list[tuple[int, int]]:
        """Count one call's experts; at a refresh, the (expert, row) pairs to copy in now
        (the caller copies them, in order with its reads of the rows)."""
        for e in experts:
            self.counts[e] += 1
        self.calls += 1
        if self.calls % REFRESH_EVERY:
            return []
        return self._swaps()

    def _swaps(self) -> list[tuple[int, int]]:
        ranked = [int(e) for e in np.argsort(-self.counts, kind="stable") if self.counts[e] > 0]
        wanted = ranked[: self.capacity]
        missing = [e for e in wanted if e not in self.row_of][:SWAPS_PER_REFRESH]
        coldest_first = sorted((e for e in self.row_of if e not in wanted), key=lambda e: self.counts[e])
        free = [r for r in range(self.capacity) if r not in self.row_of.values()]
        swaps = []
        for expert in missing:
            if free:
                row = free.pop(0)
            elif coldest_first:
                row = self.row_of.pop(coldest_first.pop(0))
            else:
                break
            self.row_of[expert] = row
            swaps.append((expert, row))
        self.counts /= 2
        return swaps


def layer_capacities(layers: Sequence[Sequence[QuantTensor]], budget_bytes: int) -> list[int]:
    """Experts per layer for a VRAM budget split evenly over the layers (each layer's experts
    may differ in size: UD quants mix types)."""
    if not layers or budget_bytes <= 0:
        return [0] * len(layers)
    per_layer = budget_bytes // len(layers)
    return [min(int(per_layer // sum(w.expert_bytes() for w in three)), three[0].shape[0])
            for three in layers]
