"""The classification task: classifiers on the one ViT, full fine-tuning (pooled tokens -> LayerNorm ->
linear) and the linear probe (frozen encoder, BatchNorm without affine -> linear, the MAE protocol), with
timm's augmentation, mixup / cutmix and label smoothing, scored by top-1 / top-5. Weights come from a
mimkit export or any layout `mimkit.checkpoint.load` reads. Its settings live in the shared sections
(`data`, `aug`, `mode`, `model.global_pool`); `options:` is empty."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from mimkit.checkpoint.load import LoadReport
from mimkit.errors import BadValue
from mimkit.finetune.class_data import build_dataset, build_transform, dataset_targets, label_subset
from mimkit.finetune.config import MODES, FinetuneConfig
from mimkit.finetune.encoder import build_encoder
from mimkit.finetune.metrics import evaluate
from mimkit.finetune.task import BuiltModel, TaskSpec, loader_options
from mimkit.models.vit import VisionTransformer


class LinearProbe(nn.Module):
    """A frozen encoder (always in eval mode) and BatchNorm1d(affine=False) + Linear on its pooled features."""

    def __init__(self, encoder: VisionTransformer, num_classes: int):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.head = nn.Sequential(nn.BatchNorm1d(encoder.embed_dim, affine=False, eps=1e-6),
                                  nn.Linear(encoder.embed_dim, num_classes))
        trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.encoder.eval()  # no drop path, and the encoder's state never moves
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.encoder.forward_head(self.encoder.forward_features(images), pre_logits=True)  # [B, D]
        return self.head(feats.float())


def build_classifier(cfg: FinetuneConfig) -> tuple[nn.Module, Optional[LoadReport], Optional[dict]]:
    """(model, load report or None for scratch, export metadata or None)."""
    encoder, report, meta = build_encoder(cfg)
    if cfg.mode == "linprobe":
        return LinearProbe(encoder, cfg.data.num_classes), report, meta
    encoder.reset_classifier(cfg.data.num_classes)
    with torch.no_grad():  # a small fresh head keeps early gradients from wrecking the pretrained encoder
        encoder.head.weight.mul_(cfg.model.head_init_scale)
    return encoder, report, meta


# ---- data ----------------------------------------------------------------------------------------
def build_loaders(cfg: FinetuneConfig, img_size: int, num_processes: int, device: torch.device):
    if cfg.data.batch_size % num_processes or cfg.data.eval_batch_size % num_processes:
        raise BadValue(f"data.batch_size={cfg.data.batch_size}, data.eval_batch_size={cfg.data.eval_batch_size}: "
                       f"global batches, expected multiples of the {num_processes} processes")
    train = build_dataset(cfg.data, "train", build_transform(cfg.data, cfg.aug, img_size, train=True))
    val = build_dataset(cfg.data, "val", build_transform(cfg.data, cfg.aug, img_size, train=False))
    if cfg.data.label_fraction < 1.0:
        train = torch.utils.data.Subset(train, label_subset(dataset_targets(train), cfg.data.label_fraction,
                                                            cfg.run.seed))
    generator = torch.Generator().manual_seed(cfg.run.seed)
    train_loader = torch.utils.data.DataLoader(train, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True,
                                               generator=generator, persistent_workers=cfg.data.num_workers > 0,
                                               **loader_options(cfg.data.num_workers, device))
    val_loader = torch.utils.data.DataLoader(val, batch_size=cfg.data.eval_batch_size, shuffle=False,
                                             **loader_options(cfg.data.num_workers, device))
    if len(train_loader) == 0:
        raise BadValue(f"data.batch_size={cfg.data.batch_size}: more than the {len(train)} training images "
                       "(no full batch to train on)")
    return train_loader, val_loader


def build_criterion(cfg: FinetuneConfig) -> tuple[Optional[Mixup], torch.nn.Module]:
    use_mix = cfg.mode == "finetune" and cfg.aug.enabled and (cfg.aug.mixup > 0 or cfg.aug.cutmix > 0)
    if use_mix:  # mixup / cutmix produce soft targets that carry the label smoothing
        mix = Mixup(mixup_alpha=cfg.aug.mixup, cutmix_alpha=cfg.aug.cutmix, prob=cfg.aug.mixup_prob,
                    switch_prob=cfg.aug.mixup_switch_prob, label_smoothing=cfg.aug.smoothing,
                    num_classes=cfg.data.num_classes)
        return mix, SoftTargetCrossEntropy()
    if cfg.aug.smoothing > 0 and cfg.mode == "finetune":
        return None, LabelSmoothingCrossEntropy(cfg.aug.smoothing)
    return None, torch.nn.CrossEntropyLoss()


# ---- the task ------------------------------------------------------------------------------------
@dataclass
class ClassificationOptions:
    """Empty: classification's settings are the shared sections (data, aug, mode, model.global_pool)."""


class Classification:
    """The :class:`mimkit.finetune.task.Task` of image classification (fine-tuning or linear probe)."""

    primary = "top1"

    def __init__(self, cfg: FinetuneConfig):
        if cfg.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
        self.cfg = cfg
        self.mixup, self.criterion = build_criterion(cfg)

    def build_model(self) -> BuiltModel:
        model, report, meta = build_classifier(self.cfg)
        return BuiltModel(model, model.encoder if isinstance(model, LinearProbe) else model, report, meta)

    def build_loaders(self, img_size: int, accelerator) -> tuple[Any, Any]:
        train_loader, val_loader = build_loaders(self.cfg, img_size, accelerator.num_processes, accelerator.device)
        return train_loader, accelerator.prepare(val_loader)  # gather_for_metrics drops the padding

    def loss(self, model: nn.Module, batch) -> dict[str, Any]:
        images, targets = batch
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        return {"loss": self.criterion(model(images).float(), targets)}

    def evaluate(self, model: nn.Module, loader, accelerator) -> dict[str, float]:
        return evaluate(model, loader, accelerator)

    def describe(self, metrics: dict[str, float]) -> str:
        return f"top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f} ({metrics['count']} images)"

    def write_results(self, model, loader, accelerator, run_dir: Path, metrics: dict[str, float]) -> None:
        pass  # results.json (the trainer's) says it all


CLASSIFICATION = TaskSpec(options=ClassificationOptions, build=Classification)
