"""Segmentation inference (whole image, sliding window, flip) and mIoU / mAcc / aAcc as mmsegmentation
computes them: per class, the intersection, union, predicted and labelled pixel counts are summed over the
whole evaluation set (across processes: an all-reduce of counts, so any process count gives the same
numbers), then IoU = intersection / union and Acc = intersection / labelled per class; mIoU and mAcc are
the means over the classes where they are defined (a class absent from both the ground truth and the
predictions has no IoU; one absent from the ground truth has no Acc), aAcc = all intersections / all
labelled pixels. Pixels labelled 255 are ignored. Values are percentages.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mimkit.finetune.seg_data import IGNORE


def intersect_and_union(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[4, C] float64 counts of one image (or any set of pixels): intersection, union, predicted, labelled."""
    keep = label != IGNORE
    pred, label = pred[keep], label[keep]
    hit = pred[pred == label]
    inter = torch.bincount(hit, minlength=num_classes)[:num_classes].double()
    area_pred = torch.bincount(pred, minlength=num_classes)[:num_classes].double()
    area_label = torch.bincount(label, minlength=num_classes)[:num_classes].double()
    return torch.stack([inter, area_pred + area_label - inter, area_pred, area_label])


def summarize(counts: torch.Tensor) -> dict[str, float]:
    """counts [4, C] summed over the set -> {"mIoU", "mAcc", "aAcc"} (percent) and per-class "IoU", "Acc"
    lists (NaN where undefined)."""
    inter, union, _, labelled = counts.double()
    iou = inter / union  # 0 / 0 = NaN: the class is in neither ground truth nor prediction
    acc = inter / labelled
    return {"mIoU": 100.0 * float(iou.nanmean()), "mAcc": 100.0 * float(acc.nanmean()),
            "aAcc": 100.0 * float(inter.sum() / labelled.sum()),
            "IoU": [100.0 * float(v) for v in iou], "Acc": [100.0 * float(v) for v in acc]}


# ---- inference ---------------------------------------------------------------------------------------
Net = Callable[[torch.Tensor], torch.Tensor]  # images [B, 3, h, w] -> logits [B, C, h', w']


def logits_at(net: Net, images: torch.Tensor) -> torch.Tensor:
    """The net's logits brought to the input's size (bilinear)."""
    out = net(images)
    if out.shape[-2:] != images.shape[-2:]:
        out = F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return out


def slide_logits(net: Net, images: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """mmsegmentation's sliding window: crops of `crop` every `stride` pixels (the last one flush with the
    edge), logits averaged where crops overlap. An image smaller than the crop is one window."""
    _, _, H, W = images.shape
    rows = max(H - crop + stride - 1, 0) // stride + 1
    cols = max(W - crop + stride - 1, 0) // stride + 1
    total, hits = None, images.new_zeros(1, 1, H, W)
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, H), min(c * stride + crop, W)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            out = logits_at(net, images[:, :, y1:y2, x1:x2])
            if total is None:
                total = images.new_zeros(images.shape[0], out.shape[1], H, W)
            total[:, :, y1:y2, x1:x2] += out
            hits[:, :, y1:y2, x1:x2] += 1
    return total / hits


def predict_logits(net: Net, images: torch.Tensor, mode: str, crop: int, stride: int, flip: bool) -> torch.Tensor:
    """Logits at the input's size, `mode` whole | slide, averaged with the flipped image's when `flip`."""
    def run(x):
        return slide_logits(net, x, crop, stride) if mode == "slide" else logits_at(net, x)

    out = run(images)
    if flip:
        out = (out + run(images.flip(-1)).flip(-1)) / 2
    return out


@torch.no_grad()
def evaluate_segmentation(net: Net, loader, num_classes: int, device: torch.device, mode: str, crop: int,
                          stride: int, flip: bool, keep: Callable[[int, dict, torch.Tensor], None] = None
                          ) -> dict[str, float]:
    """Collective: every process runs its share of the images (the loader's), the counts are summed over
    processes, every process returns the same metrics. Logits are resized to the label's original size
    before the argmax. `keep(index, sample, prediction)` sees each prediction (pictures)."""
    counts = torch.zeros(4, num_classes, dtype=torch.float64)
    images = 0
    for sample in loader:
        x = sample["image"].to(device)[None].float()
        label = sample["label"]
        logits = predict_logits(net, x, mode, crop, stride, flip).float()
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
        pred = logits.argmax(1)[0].cpu()
        counts += intersect_and_union(pred, label, num_classes)
        images += 1
        if keep is not None:
            keep(int(sample["index"]), sample, pred)
    totals = torch.cat([counts.flatten(), torch.tensor([float(images)], dtype=torch.float64)]).to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    totals = totals.cpu()
    out = summarize(totals[:-1].view(4, num_classes))
    out["count"] = int(totals[-1])
    return out


def nan_to_none(values: list[float]) -> list:
    """JSON has no NaN: undefined per-class values are written as null."""
    return [None if math.isnan(v) else round(v, 4) for v in values]
