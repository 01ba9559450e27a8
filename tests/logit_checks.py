"""How close two sets of logits [T, V] are: the measures the model tests state tolerances in."""

from __future__ import annotations

import torch


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """||ours - reference|| / ||reference|| over all entries."""
    return ((ours - reference).norm() / reference.norm()).item()


def top1_agreement(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of positions whose most likely next token is the same."""
    return (ours.argmax(-1) == reference.argmax(-1)).float().mean().item()
