"""Labelled images read by index, for fine-tuning and k-NN evaluation: an ImageFolder
(`DIR/<class>/*.jpg`) or WebDataset-style tar shards (`.jpg` + `.cls`), and the evaluation transform
(resize, centre crop, normalise).

Both datasets expose `targets` (one int label per image), so a caller can split them exactly across
processes and knows every label without reading an image.
"""

from __future__ import annotations

import io
import os
import tarfile
from typing import Callable, Optional, Sequence

import torch
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class TarShardImages(torch.utils.data.Dataset):
    """Random access into tar shards: one pass over the headers builds (shard, offset, size) per sample."""

    def __init__(self, spec: str, transform: Optional[Callable] = None):
        from mimkit.data.stream import expand_shards, split_member_name

        self.shards = [p for source in expand_shards(spec) for p in source]
        self.transform = transform
        self.items: list[tuple[int, int, int]] = []  # (shard index, byte offset, size) of each image
        self.targets: list[int] = []
        for s, path in enumerate(self.shards):
            samples: dict[str, dict] = {}
            with tarfile.open(path) as tar:
                for m in tar:
                    if not m.isfile() or "." not in os.path.basename(m.name):
                        continue
                    key, ext = split_member_name(m.name)
                    ext = ext.lower()
                    if ext in IMAGE_EXTS:
                        samples.setdefault(key, {})["image"] = (m.offset_data, m.size)
                    elif ext == "cls":
                        samples.setdefault(key, {})["cls"] = int(tar.extractfile(m).read().decode().strip())
            for key, sample in samples.items():
                if "image" in sample and "cls" in sample:  # a truncated shard leaves halves: skip them
                    self.items.append((s, *sample["image"]))
                    self.targets.append(sample["cls"])
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


def is_shard_spec(spec: str) -> bool:
    """True when `spec` names tar shards (a .tar file or pattern, or a folder holding .tar files);
    otherwise it is read as an ImageFolder."""
    if ".tar" in spec or "::" in spec:
        return True
    return os.path.isdir(spec) and any(name.endswith(".tar") for name in os.listdir(spec))


def labelled_images(spec: str, transform: Optional[Callable] = None) -> torch.utils.data.Dataset:
    """An ImageFolder (`spec/<class>/*.jpg`) or tar shards (`is_shard_spec`), with `targets`."""
    if is_shard_spec(spec):
        return TarShardImages(spec, transform)
    from torchvision.datasets import ImageFolder

    return ImageFolder(spec, transform=transform)


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 0.875,
                   interpolation: str = "bicubic") -> Callable:
    """PIL image -> normalised [3, S, S]: resized to S / crop_pct, centre crop S (timm's evaluation view,
    the one DINO's k-NN uses)."""
    from timm.data import create_transform

    return create_transform(image_size, is_training=False, interpolation=interpolation, crop_pct=crop_pct,
                            mean=tuple(mean), std=tuple(std))
