"""Counts behind accuracies, shared by fine-tuning's evaluation and k-NN monitoring."""

from __future__ import annotations

from typing import Sequence

import torch


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of samples whose target is among the k highest logits, for each k. logits [B, C], targets [B]."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # [B, kmax]
    hit = top.eq(targets[:, None])  # [B, kmax]
    return {k: int(hit[:, :min(k, kmax)].any(dim=1).sum()) for k in ks}
