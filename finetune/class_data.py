"""Labelled images for classification: an ImageFolder (`train/<wnid>/*.JPEG`, `val/<wnid>/...`) or
WebDataset-style tar shards (`mimkit.data.labelled.TarShardImages`: the pretraining stream's reader, specs,
conventions, decode and safety net), both indexable so a sampler can split them exactly across processes;
timm's transforms; a class-balanced label subset for few-label runs.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
import torch
from timm.data import create_transform
from torchvision.datasets import ImageFolder

from mimkit.data.labelled import TarShardImages
from mimkit.errors import BadValue, MissingPath
from mimkit.finetune.config import AugmentConfig, DataConfig

def build_transform(data: DataConfig, aug: AugmentConfig, img_size: int, train: bool) -> Callable:
    """timm's ImageNet transforms: RandomResizedCrop + flip + RandAugment + random erasing for training,
    resize + centre crop for evaluation."""
    if train and aug.enabled:
        return create_transform(img_size, is_training=True, scale=tuple(aug.scale), hflip=aug.hflip,
                                auto_augment=aug.auto_augment, color_jitter=aug.color_jitter,
                                interpolation=data.interpolation, re_prob=aug.reprob, re_mode="pixel",
                                re_count=1, mean=tuple(data.mean), std=tuple(data.std))
    return create_transform(img_size, is_training=False, interpolation=data.interpolation,
                            crop_pct=data.crop_pct, mean=tuple(data.mean), std=tuple(data.std))


def build_dataset(data: DataConfig, split: str, transform: Callable) -> torch.utils.data.Dataset:
    if data.format == "imagefolder":
        path = os.path.join(data.root, split)
        if not os.path.isdir(path):
            raise MissingPath(f"data.root={data.root}: no {split}/ folder in it (expected ROOT/{split}/<class>/*.JPEG)")
        try:
            return ImageFolder(path, transform=transform)
        except FileNotFoundError as err:  # torchvision: no class folders, or no images in them
            raise MissingPath(f"data.root={data.root}: {err} (expected ROOT/{split}/<class>/*.JPEG)") from None
    if data.format == "shards":
        spec = data.train_shards if split == "train" else data.val_shards
        return TarShardImages(spec, transform, data.classes, key=f"data.{split}_shards")
    raise BadValue(f"data.format={data.format!r}: expected 'imagefolder' or 'shards'")


def dataset_targets(dataset) -> list[int]:
    if isinstance(dataset, torch.utils.data.Subset):
        base = dataset_targets(dataset.dataset)
        return [base[i] for i in dataset.indices]
    return list(dataset.targets)


def label_subset(targets: Sequence[int], fraction: float, seed: int = 0) -> list[int]:
    """Indices keeping ``fraction`` of each class (at least one), the same on every process."""
    if not 0 < fraction <= 1:
        raise BadValue(f"data.label_fraction={fraction}: expected a value in (0, 1]")
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        n = max(1, int(round(fraction * len(idx))))
        keep += sorted(rng.choice(idx, size=n, replace=False).tolist())
    return sorted(keep)
