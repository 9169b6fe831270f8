"""COCO evaluation of detections: pycocotools' COCOeval for boxes and masks (RLE) on the json's own category
ids, every image counted once over all processes.

Each process turns its images' detections into COCO result records (original image id and category id,
box in the original image's pixels as x, y, w, h, score, and the mask as compressed RLE), the records of all
processes are gathered on the main process, scored there once, and the numbers sent back to every process.
The 12 numbers are COCOeval's `stats`, named as below; -1 means the val set holds no object of that size.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mimkit.finetune.coco_data import Categories

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")


def results_for_image(image_id: int, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                      masks: Optional[torch.Tensor], categories: Categories) -> list[dict]:
    """COCO result records of one image. boxes [N, 4] x1, y1, x2, y2 in the original image's pixels; labels
    1..K; masks [N, H, W] bool at the original size (or None: boxes only)."""
    boxes = boxes.detach().float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    out = []
    for i, (box, score, label) in enumerate(zip(xywh, scores.tolist(), labels.tolist())):
        record = {"image_id": int(image_id), "category_id": categories.category_id(int(label)),
                  "bbox": [round(v, 3) for v in box], "score": round(float(score), 5)}
        if masks is not None:
            rle = mask_utils.encode(np.asfortranarray(masks[i].cpu().numpy().astype(np.uint8)))
            record["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        out.append(record)
    return out


def gather_records(records: list[dict]) -> Optional[list[dict]]:
    """On the main process: the records of every process (each image is on exactly one); None elsewhere."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return records
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(records, parts, dst=0)
    return [r for part in parts for r in part] if parts is not None else None


def broadcast(value: Any) -> Any:
    """The main process's value on every process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def coco_scores(coco_gt: COCO, records: list[dict], image_ids: Sequence[int],
                iou_types: Sequence[str] = IOU_TYPES) -> tuple[dict[str, float], str]:
    """({"<type>/<stat>": value}, COCOeval's printed summary) over `image_ids`. No records: zeros (a model
    that detects nothing), not COCOeval's error on an empty result list."""
    scores, text = {}, io.StringIO()
    for iou_type in iou_types:
        kept = [r for r in records if iou_type != "segm" or "segmentation" in r]
        if not kept:
            stats = [0.0] * len(STAT_NAMES)
            text.write(f"{iou_type}: no detections\n")
        else:
            with contextlib.redirect_stdout(text):
                coco_dt = coco_gt.loadRes(_copy(kept, iou_type))
                evaluator = COCOeval(coco_gt, coco_dt, iou_type)
                evaluator.params.imgIds = sorted(image_ids)
                evaluator.evaluate()
                evaluator.accumulate()
                print(f"{iou_type}:")
                evaluator.summarize()
            stats = [float(v) for v in evaluator.stats]
        scores.update({f"{iou_type}/{name}": value for name, value in zip(STAT_NAMES, stats)})
    return scores, text.getvalue()


def _copy(records: list[dict], iou_type: str) -> list[dict]:
    """What loadRes should see (it writes into the records: copies). Boxes without masks; masks without
    boxes, or loadRes takes the box branch and sizes each detection by its box, not its mask."""
    drop = "segmentation" if iou_type == "bbox" else "bbox"
    return [{k: v for k, v in r.items() if k != drop} for r in records]


def evaluate_records(coco_gt: COCO, records: list[dict], image_ids: Sequence[int],
                     iou_types: Sequence[str] = IOU_TYPES) -> tuple[dict[str, float], str]:
    """Collective: every process's records gathered and scored once on the main process; the scores and the
    summary on every process. `image_ids`: all the images evaluated (over all processes)."""
    gathered = gather_records(records)
    result = coco_scores(coco_gt, gathered, image_ids, iou_types) if gathered is not None else None
    return broadcast(result)
