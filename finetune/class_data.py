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

from mimkit.finetune.config import AugmentConfig, DataConfig

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class TarShardIndex:
    """Random access into tar shards: one pass over the headers finds, per sample key, the (shard, byte
    offset, size) of the members whose extensions are asked for; `read` returns a member's bytes. Members
    are read, never extracted. Open handles stay per process (they do not travel to DataLoader workers)."""

    def __init__(self, spec: str, wanted: Callable[[str], bool]):
        from mimkit.data.stream import expand_shards, split_member_name

        self.shards = [p for source in expand_shards(spec) for p in source]
        self.samples: list[dict[str, tuple[int, int, int]]] = []  # per sample: {ext: (shard, offset, size)}
        for s, path in enumerate(self.shards):
            by_key: dict[str, dict] = {}
            with tarfile.open(path) as tar:
                for m in tar:
                    if not m.isfile() or "." not in os.path.basename(m.name):
                        continue
                    key, ext = split_member_name(m.name)
                    if wanted(ext):
                        by_key.setdefault(key, {})[ext] = (s, m.offset_data, m.size)
            self.samples += by_key.values()
        self._files: dict[int, object] = {}

    def read(self, member: tuple[int, int, int]) -> bytes:
        s, offset, size = member
        if s not in self._files:
            self._files[s] = open(self.shards[s], "rb")
        f = self._files[s]
        f.seek(offset)
        return f.read(size)

    def __getstate__(self):  # handles do not travel to workers
        state = dict(self.__dict__)
        state["_files"] = {}
        return state


class TarShardImages(torch.utils.data.Dataset):
    """Labelled images (`.jpg` + `.cls`) in tar shards, by index."""

    def __init__(self, spec: str, transform: Optional[Callable] = None):
        self.index = TarShardIndex(spec, lambda ext: ext in IMAGE_EXTS or ext == "cls")
        self.transform = transform
        self.items: list[tuple[int, int, int]] = []  # the image member of each sample
        self.targets: list[int] = []
        for sample in self.index.samples:
            image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
            if image is not None and "cls" in sample:  # a truncated shard leaves halves: skip them
                self.items.append(image)
                self.targets.append(int(self.index.read(sample["cls"]).decode().strip()))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        image = Image.open(io.BytesIO(self.index.read(self.items[index]))).convert("RGB")
        return (self.transform(image) if self.transform else image), self.targets[index]


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
            raise FileNotFoundError(f"data.root: {path} is not a folder (expected ROOT/{split}/<class>/*.JPEG)")
        return ImageFolder(path, transform=transform)
    if data.format == "shards":
        spec = data.train_shards if split == "train" else data.val_shards
        return TarShardImages(spec, transform)
    raise ValueError(f"data.format must be 'imagefolder' or 'shards', got {data.format!r}")


def dataset_targets(dataset) -> list[int]:
    if isinstance(dataset, torch.utils.data.Subset):
        base = dataset_targets(dataset.dataset)
        return [base[i] for i in dataset.indices]
    return list(dataset.targets)


def label_subset(targets: Sequence[int], fraction: float, seed: int = 0) -> list[int]:
    """Indices keeping ``fraction`` of each class (at least one), the same on every process."""
    if not 0 < fraction <= 1:
        raise ValueError(f"data.label_fraction must be in (0, 1], got {fraction}")
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        n = max(1, int(round(fraction * len(idx))))
        keep += sorted(rng.choice(idx, size=n, replace=False).tolist())
    return sorted(keep)
