"""The semantic-segmentation task (ADE20K): `task: segmentation`, settings in `options:`.

Network: the fine-tuning ViT (`encoder.py`: an export or any layout mimkit.checkpoint.load reads, position
tables resized to the crop) and a head chosen by `options.head`:
  upernet            the BEiT / MAE / MILAN protocol: 4-scale pyramid from blocks 4, 6, 8, 12
                     (`mimkit.models.pyramid`), UperNet (PPM 1, 2, 3, 6 + FPN, `channels` wide), plus the
                     FCN auxiliary head on the stride-16 level with loss weight `aux_weight`
  linear             Segmenter's linear decoder on the last block's (normed) patch tokens
  mask_transformer   Segmenter's mask transformer on the same tokens
BatchNorm in the heads is synchronised across processes. Loss: cross-entropy at the label's resolution,
255 ignored (summed over the labelled pixels and divided by all pixels of the crop, as mmsegmentation).
Evaluation: `eval_mode` whole (the image resized to the network's input) or slide (crop windows every
`eval_stride` pixels), optional flip; mIoU / mAcc / aAcc as mmsegmentation (`seg_metrics.py`), each process
evaluating its share of the images. Results: RUN/per_class_iou.json and .txt, and
RUN/pictures/segmentation.png (of the last evaluation: the EMA's when there is one).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mimkit.distributed.sync_bn import convert_sync_batchnorm
from mimkit.finetune.config import FinetuneConfig
from mimkit.finetune.encoder import build_encoder
from mimkit.finetune.seg_data import IGNORE, SegPipeline, build_seg_dataset, single
from mimkit.finetune.seg_heads import FCNHead, LinearDecoder, MaskTransformer, UperNetHead
from mimkit.finetune.seg_metrics import evaluate_segmentation, nan_to_none
from mimkit.finetune.task import BuiltModel, TaskSpec, loader_options
from mimkit.models.pyramid import ViTPyramid
from mimkit.models.vit import VisionTransformer

HEADS = ("upernet", "linear", "mask_transformer")
EVAL_MODES = ("whole", "slide")


@dataclass
class SegmentationOptions:
    head: str = "upernet"  # upernet | linear | mask_transformer (Segmenter)
    crop_size: int = 512  # training crop = the network's input size (position tables resized to it)
    scale: list[int] = field(default_factory=lambda: [2048, 512])  # (long, short) side at ratio 1; eval resize
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75  # a training crop is redrawn (up to 10 times) while one class covers more
    hflip: float = 0.5
    photometric: bool = True
    reduce_zero_label: bool = True  # ADE20K: label 0 ("other") -> 255 (ignored), k -> k - 1
    channels: int = 768  # UperNet width (768 for ViT-B in BEiT / MAE)
    pool_scales: list[int] = field(default_factory=lambda: [1, 2, 3, 6])
    dropout: float = 0.1  # before UperNet's and the FCN head's classifier
    aux_channels: int = 256  # the FCN auxiliary head
    aux_weight: float = 0.4  # 0: no auxiliary head
    blocks: Optional[list[int]] = None  # 0-based blocks feeding the pyramid; None: 3, 5, 7, 11 of 12, proportional
    mask_dim: int = 768  # mask transformer width, layers, heads (Segmenter ViT-B: 768, 2, 12)
    mask_layers: int = 2
    mask_heads: int = 12
    eval_mode: str = "slide"  # slide | whole
    eval_stride: int = 341
    eval_flip: bool = False
    val_images: int = 0  # > 0: evaluate on the first N validation images only (quick comparisons)
    class_names: Optional[list[str]] = None  # for the per-class table; None: class_0, class_1, ...
    pictures: int = 4  # val images drawn with ground truth and prediction (0: none)


class SegmentationModel(nn.Module):
    """images [B, 3, S, S] (S the crop) -> logits [B, classes, S, S] (and the auxiliary logits in training).
    `forward` takes any size: an image of another size is resized to S and its logits back."""

    def __init__(self, encoder: VisionTransformer, opts: SegmentationOptions, num_classes: int):
        super().__init__()
        self.input_size, self.head_kind = encoder.cfg.img_size, opts.head
        D = encoder.embed_dim
        if opts.head == "upernet":
            self.pyramid = ViTPyramid(encoder, opts.blocks)
            self.decode = UperNetHead(self.pyramid.channels, opts.channels, num_classes, opts.pool_scales, opts.dropout)
            self.aux = FCNHead(D, opts.aux_channels, num_classes, opts.dropout) if opts.aux_weight > 0 else None
        else:
            encoder.fc_norm, encoder.head = nn.Identity(), nn.Identity()  # the final norm stays; pooling goes
            self.encoder = encoder
            if opts.head == "linear":
                self.decode = LinearDecoder(D, num_classes, encoder.grid_size)
            else:
                self.decode = MaskTransformer(D, num_classes, encoder.grid_size, opts.mask_dim, opts.mask_layers,
                                              opts.mask_heads, encoder.cfg.drop_path)
            self.aux = None

    def logits(self, images: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(main logits, auxiliary logits or None), each at its head's resolution."""
        if self.head_kind == "upernet":
            maps = self.pyramid(images)
            return self.decode(maps), (self.aux(maps[2]) if self.aux is not None and self.training else None)
        tokens = self.encoder.forward_features(images)[:, self.encoder.num_prefix_tokens:]
        return self.decode(tokens), None

    def forward(self, images: torch.Tensor, with_aux: bool = False):
        """Inference: logits at the images' size. `with_aux` (training, through DDP): `logits(images)`."""
        if with_aux:
            return self.logits(images)
        size = images.shape[-2:]
        x = images
        if tuple(size) != (self.input_size, self.input_size):
            x = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        out, _ = self.logits(x)
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)


def pixel_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at the label's size, 255 ignored, divided by all pixels (mmsegmentation's default)."""
    logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, label, ignore_index=IGNORE, reduction="sum") / label.numel()


class Segmentation:
    """The :class:`mimkit.finetune.task.Task` of semantic segmentation."""

    primary = "mIoU"

    def __init__(self, cfg: FinetuneConfig):
        opts: SegmentationOptions = cfg.options
        checks = (("mode", cfg.mode, ("finetune",)), ("options.head", opts.head, HEADS),
                  ("options.eval_mode", opts.eval_mode, EVAL_MODES), ("data.format", cfg.data.format, ("ade", "shards")))
        for key, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"{key} must be one of {allowed} for segmentation, got {value!r}")
        if opts.crop_size < 1 or opts.eval_stride < 1 or len(opts.scale) != 2 or len(opts.ratio_range) != 2:
            raise ValueError(f"options: crop_size {opts.crop_size} and eval_stride {opts.eval_stride} must be >= 1, "
                             f"scale {opts.scale} and ratio_range {opts.ratio_range} pairs")
        if opts.class_names is not None and len(opts.class_names) != cfg.data.num_classes:
            raise ValueError(f"options.class_names has {len(opts.class_names)} names, data.num_classes is "
                             f"{cfg.data.num_classes}")
        self.cfg, self.opts = cfg, opts
        self.kept: list[tuple[int, dict, torch.Tensor]] = []

    def build_model(self) -> BuiltModel:
        cfg = copy.deepcopy(self.cfg)
        cfg.model.img_size = self.opts.crop_size
        cfg.model.global_pool = "token"  # keeps the encoder's final norm (Segmenter reads normed tokens)
        encoder, report, meta = build_encoder(cfg)
        model = SegmentationModel(encoder, self.opts, cfg.data.num_classes)
        if dist.is_initialized() and dist.get_world_size() > 1:
            on_gpu = torch.cuda.is_available() and not cfg.cpu
            model = convert_sync_batchnorm(model, "cuda" if on_gpu else "cpu")
        return BuiltModel(model, encoder, report, meta)

    def build_loaders(self, img_size: int, accelerator) -> tuple[Any, Any]:
        cfg, opts = self.cfg, self.opts
        if cfg.data.batch_size % accelerator.num_processes:
            raise ValueError(f"data.batch_size is global: make it a multiple of the {accelerator.num_processes} processes")
        pipeline = SegPipeline(img_size, opts.scale, opts.ratio_range, opts.cat_max_ratio, opts.hflip, opts.photometric,
                               opts.reduce_zero_label, cfg.data.mean, cfg.data.std)
        train = build_seg_dataset(cfg.data.format, cfg.data.root, cfg.data.train_shards, "train", pipeline, cfg.run.seed)
        val = build_seg_dataset(cfg.data.format, cfg.data.root, cfg.data.val_shards, "val", pipeline, cfg.run.seed)
        generator = torch.Generator().manual_seed(cfg.run.seed)
        workers = loader_options(cfg.data.num_workers, accelerator.device)
        train_loader = torch.utils.data.DataLoader(train, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True,
                                                   generator=generator, persistent_workers=cfg.data.num_workers > 0,
                                                   **workers)
        if len(train_loader) == 0:
            raise ValueError(f"{len(train)} training images give no batch of {cfg.data.batch_size}")
        # Each process evaluates every num_processes-th image; the counts are summed (seg_metrics.py).
        count = min(len(val), opts.val_images) if opts.val_images > 0 else len(val)
        share = torch.utils.data.Subset(val, range(accelerator.process_index, count, accelerator.num_processes))
        val_loader = torch.utils.data.DataLoader(share, batch_size=1, collate_fn=single, **workers)
        return train_loader, val_loader

    def loss(self, model: nn.Module, batch: dict) -> dict[str, Any]:
        out, aux = model(batch["image"], with_aux=True)
        main = pixel_loss(out, batch["label"])
        if aux is None:
            return {"loss": main}
        aux_loss = pixel_loss(aux, batch["label"])
        return {"loss": main + self.opts.aux_weight * aux_loss, "loss_main": main.detach(), "loss_aux": aux_loss.detach()}

    def evaluate(self, model: nn.Module, loader, accelerator) -> dict[str, float]:
        net = accelerator.unwrap_model(model)  # no DDP collectives: processes run different image counts
        net.eval()
        self.kept = []

        def keep(index: int, sample: dict, pred: torch.Tensor) -> None:
            if accelerator.is_main_process and len(self.kept) < self.opts.pictures:
                self.kept.append((index, sample, pred))

        with accelerator.autocast():
            out = evaluate_segmentation(net, loader, self.cfg.data.num_classes, accelerator.device, self.opts.eval_mode,
                                        net.input_size, self.opts.eval_stride, self.opts.eval_flip, keep)
        # per class (None where undefined: JSON has no NaN) for write_results; results.json keeps them too
        out["per_class"] = {"IoU": nan_to_none(out.pop("IoU")), "Acc": nan_to_none(out.pop("Acc"))}
        return out

    def describe(self, metrics: dict[str, float]) -> str:
        return (f"mIoU {metrics['mIoU']:.2f} mAcc {metrics['mAcc']:.2f} aAcc {metrics['aAcc']:.2f} "
                f"({metrics['count']} images)")

    def write_results(self, model, loader, accelerator, run_dir: Path, metrics: dict[str, float]) -> None:
        if not accelerator.is_main_process:
            return
        names = self.opts.class_names or [f"class_{i}" for i in range(self.cfg.data.num_classes)]
        iou, acc = metrics["per_class"]["IoU"], metrics["per_class"]["Acc"]
        (run_dir / "per_class_iou.json").write_text(json.dumps(
            {"classes": names, "IoU": iou, "Acc": acc, **{k: metrics[k] for k in ("mIoU", "mAcc", "aAcc")}}, indent=1))
        rows = [f"{'class':<24}{'IoU':>8}{'Acc':>8}"] + [
            f"{n:<24}{'-' if i is None else f'{i:.2f}':>8}{'-' if a is None else f'{a:.2f}':>8}"
            for n, i, a in zip(names, iou, acc)]
        rows.append(f"{'mean':<24}{metrics['mIoU']:>8.2f}{metrics['mAcc']:>8.2f}   aAcc {metrics['aAcc']:.2f}")
        (run_dir / "per_class_iou.txt").write_text("\n".join(rows) + "\n")
        if self.kept:
            from mimkit.pictures import denormalize, save_segmentations, segmentation_palette

            images = [denormalize(s["image"], self.cfg.data.mean, self.cfg.data.std) for _, s, _ in self.kept]
            save_segmentations(images, [s["label"] for _, s, _ in self.kept], [p for _, _, p in self.kept],
                               segmentation_palette(self.cfg.data.num_classes), run_dir / "pictures" / "segmentation.png",
                               titles=[f"val image {i}" for i, _, _ in self.kept])


SEGMENTATION = TaskSpec(options=SegmentationOptions, build=Segmentation)
