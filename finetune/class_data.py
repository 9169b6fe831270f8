"""Labelled images for classification: an ImageFolder (`train/<wnid>/*.JPEG`, `val/<wnid>/...`) or
WebDataset-style tar shards (`.jpg` + `.cls`), both indexable so a sampler can split them exactly
across processes; timm's transforms; a class-balanced label subset for few-label runs.
"""

from __future__ import annotations

import io
import os
import tarfile
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torchvision.datasets import ImageFolder

from mimkit.errors import BadValue, MissingPath
from mimkit.finetune.config import AugmentConfig, DataConfig

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class TarShardImages(torch.utils.data.Dataset):
    """Random access into tar shards: one pass over the headers builds (shard, offset, size) per sample."""

    def __init__(self, spec: str, transform: Optional[Callable] = None, key: str = "data.train_shards"):
        from mimkit.data.stream import expand_shards, split_member_name

        self.shards = [p for source in expand_shards(spec, key) for p in source]
        self.transform = transform
        self.items: list[tuple[int, int, int]] = []  # (shard index, byte offset, size) of each image
        self.targets: list[int] = []
        unlabelled = 0
        for s, path in enumerate(self.shards):
            samples: dict[str, dict] = {}
            with tarfile.open(path) as tar:
                for m in tar:
                    if not m.isfile() or "." not in os.path.basename(m.name):
                        continue
                    sample_key, ext = split_member_name(m.name)
                    ext = ext.lower()
                    if ext in IMAGE_EXTS:
                        samples.setdefault(sample_key, {})["image"] = (m.offset_data, m.size)
                    elif ext == "cls":
                        samples.setdefault(sample_key, {})["cls"] = int(tar.extractfile(m).read().decode().strip())
            for sample in samples.values():
                if "image" in sample and "cls" in sample:  # a truncated shard leaves halves: skip them
                    self.items.append((s, *sample["image"]))
                    self.targets.append(sample["cls"])
                unlabelled += "image" in sample and "cls" not in sample
        if not self.items:
            raise BadValue(f"{key}={spec}: no labelled images in {len(self.shards)} shard(s)"
                           + (f" ({unlabelled} images without .cls labels: fine-tuning needs the class index beside each "
                              "image, as `mimkit shards imagefolder` writes it)" if unlabelled else ""))
        self._files: dict[int, object] = {}  # per-worker open handles

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        s, offset, size = self.items[index]
        if s not in self._files:
            self._files[s] = open(self.shards[s], "rb")
        f = self._files[s]
        f.seek(offset)
        image = Image.open(io.BytesIO(f.read(size))).convert("RGB")
        return (self.transform(image) if self.transform else image), self.targets[index]

    def __getstate__(self):  # handles do not travel to workers
        state = dict(self.__dict__)
        state["_files"] = {}
        return state


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
        key = "data.train_shards" if split == "train" else "data.val_shards"
        return TarShardImages(getattr(data, key.split(".")[1]), transform, key)
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
