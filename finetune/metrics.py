"""Top-k accuracy over a whole evaluation set, across processes, each sample counted once."""

from __future__ import annotations

from typing import Sequence

import torch

from mimkit.metrics import topk_correct


@torch.no_grad()
def evaluate(model, loader, accelerator, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """top-k (percent), loss and sample count. ``gather_for_metrics`` drops the samples the sampler
    repeated to give every process equal batches, so each image counts once."""
    model.eval()
    correct = {k: 0 for k in ks}
    total, loss_sum = 0, 0.0
    for images, targets in loader:
        with accelerator.autocast():
            logits = model(images)
        logits, targets = accelerator.gather_for_metrics((logits.float(), targets))
        loss_sum += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        for k, n in topk_correct(logits, targets, ks).items():
            correct[k] += n
        total += targets.numel()
    out = {f"top{k}": 100.0 * correct[k] / max(total, 1) for k in ks}
    out.update(loss=loss_sum / max(total, 1), count=total)
    return out
