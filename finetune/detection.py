"""The detection task: COCO object detection and instance segmentation with a ViTDet-style Mask R-CNN.

The network: the ViT (an export or any layout `mimkit.checkpoint.load` reads, or scratch) as a ViTDet
backbone (`mimkit.models.vitdet`: window attention in most blocks, global attention in a few evenly spaced
ones, relative-position tables or the absolute table resized to the windows and the grid by the loader),
the simple feature pyramid, and torchvision's Mask R-CNN parts: RPN (2 convs), RoIAlign, a box head of
4 convs + 1 fc with channel LayerNorm, a mask head of 4 convs with LayerNorm. Inputs come padded to a fixed
square (`model.img_size`) by the data (`coco_data.py`), so torchvision's own resizing transform is not used.

Training loss: the sum of torchvision's five (RPN objectness and box, classifier, box regression, mask),
each logged. Evaluation (`coco_eval.py`): every process predicts its share of the val images, boxes and
masks go back to the original image's pixels, COCOeval scores bbox and segm once on the json's category
ids; the metrics are COCO's 12 numbers per type in percent (`bbox_AP`, `segm_AP50`, ..., -1: no object of
that size). `write_results` puts them in RUN/coco_eval.json (+ COCOeval's printout, coco_eval.txt) and draws
predictions beside the ground truth in RUN/pictures/detections.png.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
from timm.layers import LayerNorm2d
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, paste_masks_in_image
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign

from mimkit.finetune.coco_data import Categories, CocoInstances, CocoLayout, check_layout, collate, read_coco
from mimkit.finetune.coco_eval import STAT_NAMES, evaluate_records, results_for_image
from mimkit.finetune.config import FinetuneConfig
from mimkit.finetune.encoder import build_encoder
from mimkit.finetune.task import BuiltModel, TaskSpec, loader_options
from mimkit.models.vit import ViTConfig
from mimkit.models.vitdet import ViTDetBackbone, evenly_spaced_global_blocks
from mimkit.pictures import save_detections


@dataclass
class DetectionOptions:
    """The `options:` section of a detection run (defaults: ViTDet's COCO Mask R-CNN recipe)."""

    train_images: str = "train2017"  # under data.root
    train_annotations: str = "annotations/instances_train2017.json"
    val_images: str = "val2017"
    val_annotations: str = "annotations/instances_val2017.json"
    keep_empty: bool = False  # keep training images without any (non-crowd) annotation
    max_val_images: int = 0  # > 0: evaluate on the first N val images only (quick runs; COCOeval on those)
    scale_range: list[float] = field(default_factory=lambda: [0.1, 2.0])  # large-scale jitter, of model.img_size
    hflip: float = 0.5
    window_size: int = 14  # window attention (patches); 0: global attention everywhere
    global_blocks: list[int] = field(default_factory=list)  # empty: `num_global` evenly spaced blocks
    num_global: int = 4
    pyramid_dim: int = 256
    pyramid_scales: list[float] = field(default_factory=lambda: [4.0, 2.0, 1.0, 0.5])  # of the stride-16 map
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # one per level (+ pooled)
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    box_fc_dim: int = 1024  # the box head's fc after its 4 convs
    rpn_convs: int = 2
    rpn_pre_nms: list[int] = field(default_factory=lambda: [2000, 1000])  # per level: training, testing
    rpn_post_nms: list[int] = field(default_factory=lambda: [1000, 1000])  # training, testing
    rois_per_image: int = 512
    score_threshold: float = 0.05
    nms_threshold: float = 0.5
    detections_per_image: int = 100
    mask_threshold: float = 0.5
    num_pictures: int = 6
    picture_score: float = 0.5  # predictions drawn from this score


class MaskRCNN(nn.Module):
    """ViTDet backbone + torchvision's RPN and RoI heads on fixed-size padded inputs.

    forward(images [B, 3, S, S], targets): each target holds `size` (the valid h, w of its image) and, when
    training, `boxes`, `labels`, `masks`. Training returns torchvision's loss dict; eval returns per image
    `boxes` (input pixels), `labels`, `scores`, `masks` [N, 1, 28, 28] probabilities in the box."""

    def __init__(self, backbone: ViTDetBackbone, num_classes: int, opts: DetectionOptions):
        super().__init__()
        self.backbone = backbone
        dim, levels = backbone.out_channels, backbone.feature_names
        if len(opts.anchor_sizes) != len(levels):
            raise ValueError(f"options.anchor_sizes: {len(opts.anchor_sizes)} sizes for {len(levels)} pyramid "
                             f"levels ({', '.join(levels)})")
        anchors = AnchorGenerator(tuple((s,) for s in opts.anchor_sizes), (tuple(opts.aspect_ratios),) * len(levels))
        rpn_head = RPNHead(dim, len(opts.aspect_ratios), conv_depth=opts.rpn_convs)
        self.rpn = RegionProposalNetwork(
            anchors, rpn_head, fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
            pre_nms_top_n={"training": opts.rpn_pre_nms[0], "testing": opts.rpn_pre_nms[1]},
            post_nms_top_n={"training": opts.rpn_post_nms[0], "testing": opts.rpn_post_nms[1]}, nms_thresh=0.7)
        pooled = levels[:-1] if backbone.pyramid.top_pool else levels  # the max-pooled level only feeds the RPN
        self.roi_heads = RoIHeads(
            MultiScaleRoIAlign(pooled, 7, sampling_ratio=2),
            FastRCNNConvFCHead((dim, 7, 7), [dim] * 4, [opts.box_fc_dim], norm_layer=LayerNorm2d),
            FastRCNNPredictor(opts.box_fc_dim, num_classes + 1),
            fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=opts.rois_per_image, positive_fraction=0.25,
            bbox_reg_weights=None, score_thresh=opts.score_threshold, nms_thresh=opts.nms_threshold,
            detections_per_img=opts.detections_per_image,
            mask_roi_pool=MultiScaleRoIAlign(pooled, 14, sampling_ratio=2),
            mask_head=MaskRCNNHeads(dim, [dim] * 4, 1, norm_layer=LayerNorm2d),
            mask_predictor=MaskRCNNPredictor(dim, dim, num_classes + 1))

    def forward(self, images: torch.Tensor, targets: list[dict]):
        sizes = [(int(t["size"][0]), int(t["size"][1])) for t in targets]
        features = self.backbone(images)
        truth = targets if self.training else None
        proposals, rpn_losses = self.rpn(ImageList(images, sizes), features, truth)
        detections, roi_losses = self.roi_heads(features, proposals, sizes, truth)
        return {**rpn_losses, **roi_losses} if self.training else detections


def vitdet_architecture(vit: ViTConfig, opts: DetectionOptions) -> ViTConfig:
    """The fine-tuning ViT as a ViTDet backbone: no class token, windows with evenly spaced global blocks,
    per-block rel-pos tables (a BEiT export's shared table is expanded, as in BEiT's fine-tuning), no pooling."""
    global_blocks = list(opts.global_blocks) or evenly_spaced_global_blocks(vit.depth, opts.num_global)
    return dataclasses.replace(vit, class_token=False, window_size=opts.window_size, global_blocks=global_blocks,
                               rel_pos="block" if vit.rel_pos == "shared" else vit.rel_pos, num_classes=0,
                               global_pool="avg", fc_norm=True)


def build_detector(cfg: FinetuneConfig, num_classes: int) -> BuiltModel:
    opts: DetectionOptions = cfg.options
    encoder, report, meta = build_encoder(cfg, adapt=lambda vit: vitdet_architecture(vit, opts))
    encoder.fc_norm = nn.Identity()  # built to drop the export's final norm; nothing pools here
    if report is not None:
        report.missing = [k for k in report.missing if not k.startswith("fc_norm.")]
    backbone = ViTDetBackbone(encoder, opts.pyramid_dim, opts.pyramid_scales)
    return BuiltModel(MaskRCNN(backbone, num_classes, opts), encoder, report, meta)


def detection_loss(model: nn.Module, images: torch.Tensor, targets: list[dict]) -> dict[str, Any]:
    """{"loss": the sum of torchvision's five losses, and each of them (detached, for the log)}."""
    losses = model(images, targets)
    return {"loss": sum(losses.values()), **{k: v.detach() for k, v in losses.items()}}


def to_original(detection: dict, target: dict, mask_threshold: float) -> dict:
    """A detection in input pixels -> boxes and bool masks [N, h, w] on the original image."""
    h, w = (int(v) for v in target["orig_size"])
    sy, sx = (float(v) for v in target["scale"])
    boxes = detection["boxes"] / torch.tensor([sx, sy, sx, sy], device=detection["boxes"].device)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    out = {"boxes": boxes, "labels": detection["labels"], "scores": detection["scores"], "masks": None}
    if "masks" in detection:
        out["masks"] = paste_masks_in_image(detection["masks"], boxes, (h, w))[:, 0] > mask_threshold
    return out


class Detection:
    """The :class:`mimkit.finetune.task.Task` of COCO detection + instance segmentation (Mask R-CNN)."""

    primary = "bbox_AP"

    def __init__(self, cfg: FinetuneConfig):
        opts: DetectionOptions = cfg.options
        self.cfg, self.opts = cfg, opts
        self.layout = CocoLayout(opts.train_images, opts.train_annotations, opts.val_images, opts.val_annotations)
        problem = check_layout(cfg.data.root, self.layout)
        if problem:
            raise ValueError(problem)
        if cfg.mode != "finetune":
            raise ValueError(f"mode={cfg.mode!r}: detection fine-tunes the whole network (mode: finetune)")
        if not cfg.model.img_size:
            raise ValueError("model.img_size is empty: detection needs the square input size (ViTDet: 1024)")
        if len(opts.scale_range) != 2 or not 0 < opts.scale_range[0] <= opts.scale_range[1]:
            raise ValueError(f"options.scale_range must be [low, high] with 0 < low <= high, got {opts.scale_range}")
        levels = len(opts.pyramid_scales) + 1  # + the max-pooled level
        if len(opts.anchor_sizes) != levels:
            raise ValueError(f"options.anchor_sizes: {len(opts.anchor_sizes)} sizes for {levels} pyramid levels "
                             f"(options.pyramid_scales {list(opts.pyramid_scales)} + the pooled one)")
        self.categories: Optional[Categories] = None
        self.summary, self.val_set = "", None

    def build_model(self) -> BuiltModel:
        # the label space: the val json is read (the smaller one); build_loaders checks the train json agrees
        self.categories = Categories.from_coco(read_coco(self.layout.paths(self.cfg.data.root, "val")[1]))
        return build_detector(self.cfg, len(self.categories))

    def build_loaders(self, img_size: int, accelerator) -> tuple[Any, Any]:
        cfg, opts, world = self.cfg, self.opts, accelerator.num_processes
        if cfg.data.batch_size % world or cfg.data.eval_batch_size % world:
            raise ValueError(f"data.batch_size and data.eval_batch_size are global: make them multiples of the "
                             f"{world} processes")
        jitter = {"scale_range": opts.scale_range, "hflip": opts.hflip} if cfg.aug.enabled else \
            {"scale_range": (1.0, 1.0), "hflip": 0.0}  # the eval geometry for training too
        common = {"size": img_size, "mean": cfg.data.mean, "std": cfg.data.std}
        train = CocoInstances(*self.layout.paths(cfg.data.root, "train"), train=True, keep_empty=opts.keep_empty,
                              seed=cfg.run.seed, **jitter, **common)
        if train.categories != self.categories:
            raise ValueError(f"data.root={cfg.data.root}: the train and val annotation files list different categories")
        self.val_set = CocoInstances(*self.layout.paths(cfg.data.root, "val"), train=False,
                                     limit=opts.max_val_images, **common)
        # Workers are not persistent: each epoch's workers copy the dataset after set_epoch (seeded jitter).
        train_loader = torch.utils.data.DataLoader(
            train, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True, collate_fn=collate,
            generator=torch.Generator().manual_seed(cfg.run.seed), **loader_options(cfg.data.num_workers, accelerator.device))
        if len(train_loader) == 0:
            raise ValueError(f"{len(train)} training images give no batch of data.batch_size={cfg.data.batch_size}")
        # evaluation: each process its own images (every `world`-th), each image once over all processes
        shard = torch.utils.data.Subset(self.val_set, range(accelerator.process_index, len(self.val_set), world))
        val_loader = torch.utils.data.DataLoader(shard, batch_size=cfg.data.eval_batch_size // world,
                                                 collate_fn=collate, **loader_options(cfg.data.num_workers, accelerator.device))
        return train_loader, val_loader

    def loss(self, model: nn.Module, batch) -> dict[str, Any]:
        return detection_loss(model, *batch)

    @torch.no_grad()
    def predict(self, model: nn.Module, images: torch.Tensor, targets: list[dict]) -> list[dict]:
        """Detections on the original images' pixels (boxes, labels, scores, bool masks)."""
        return [to_original(d, t, self.opts.mask_threshold) for d, t in zip(model(images, targets), targets)]

    def evaluate(self, model: nn.Module, loader, accelerator) -> dict[str, float]:
        model = accelerator.unwrap_model(model).eval()
        records = []
        for images, targets in loader:
            for found, target in zip(self.predict(model, images.to(accelerator.device), targets), targets):
                records += results_for_image(target["image_id"], found["boxes"], found["scores"], found["labels"],
                                             found["masks"], self.categories)
        scores, self.summary = evaluate_records(self.val_set.coco, records, self.val_set.image_ids)
        metrics = {f"{k.replace('/', '_')}": (v if v < 0 else 100.0 * v) for k, v in scores.items()}
        return metrics | {"count": len(self.val_set)}

    def describe(self, metrics: dict[str, float]) -> str:
        return (f"box AP {metrics['bbox_AP']:.1f} (AP50 {metrics['bbox_AP50']:.1f}), mask AP {metrics['segm_AP']:.1f} "
                f"(AP50 {metrics['segm_AP50']:.1f}) ({metrics['count']} images)")

    def write_results(self, model, loader, accelerator, run_dir: Path, metrics: dict[str, float]) -> None:
        if not accelerator.is_main_process:
            return
        table = {kind: {name: metrics[f"{kind}_{name}"] for name in STAT_NAMES} for kind in ("bbox", "segm")}
        (run_dir / "coco_eval.json").write_text(json.dumps(table, indent=2))
        (run_dir / "coco_eval.txt").write_text(self.summary)
        if self.opts.num_pictures > 0:
            self.save_pictures(accelerator.unwrap_model(model).eval(), accelerator.device, run_dir / "pictures")

    def save_pictures(self, model: nn.Module, device, folder: Path) -> Path:
        """The first val images: the json's objects beside the predictions (on the original images)."""
        val = self.val_set
        samples = [val[i] for i in range(min(self.opts.num_pictures, len(val)))]
        images, targets = collate(samples)
        found = self.predict(model, images.to(device), targets)
        pictures, truth = [], []
        for target in targets:
            image_id = target["image_id"]
            pictures.append(np.asarray(val.load_image(image_id), dtype=np.float32) / 255.0)
            anns = [a for a in val.coco.imgToAnns[image_id] if a["category_id"] in val.categories.ids]
            xywh = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
            truth.append({"boxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
                          "labels": np.array([val.categories.label(a["category_id"]) for a in anns]),
                          "masks": np.stack([val.coco.annToMask(a) for a in anns]) if anns else None})
        return save_detections(pictures, truth, found, val.categories.names, folder / "detections.png",
                               min_score=self.opts.picture_score)


DETECTION = TaskSpec(options=DetectionOptions, build=Detection)
