"""Labelled images read by index, for fine-tuning and k-NN evaluation: an ImageFolder
(`DIR/<class>/*.jpg`) or WebDataset-style tar shards, and the evaluation transform (resize, centre crop,
normalise).

Both datasets expose `targets` (one int label per image), so a caller can split them exactly across
processes and knows every label without reading an image.

Shards are read by the one shard reader of mimkit (`mimkit.data.sources`, the pretraining stream's): the
same specs (local / .tar.gz / pipe: / fsspec URLs), sample conventions (image key, `.cls` integer or class
names through classes.json / `data.classes`), decode (`decode_image`: 16-bit images rescaled, as in
pretraining) and safety net: a truncated shard keeps its whole samples, a sample without image or label is
skipped and counted when indexing, and an image that does not decode is counted and replaced by the next
one that does, so one bad file never ends a run. Streamed shards are spooled to a local file once.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from typing import Callable, Optional, Sequence

import torch

from mimkit.errors import BadValue

MAX_STAND_INS = 100  # undecodable images in a row before giving up on an index


class TarShardImages(torch.utils.data.Dataset):
    """Random access into tar shards (`mimkit.data.sources.index_shards`): each sample's image member and
    label, found in one pass; local uncompressed tars by their headers alone, other shards spooled once."""

    def __init__(self, spec: str, transform: Optional[Callable] = None, classes: str = "",
                 key: str = "data.train_shards"):
        from mimkit.data.sources import BadLabel, LabelReader, MemberReader, expand_shards, find_classes, image_key, \
            index_shards, member_bytes
        from mimkit.data.stream import SkipCounter

        if not spec:
            raise BadValue(f"{key} is empty: data.format=shards needs a shard spec")
        labels = LabelReader(find_classes(expand_shards(spec, key), classes))
        self.transform = transform
        self.skips = SkipCounter(warn=False)  # indexing: one summary line below, not one per sample
        found = Counter()

        def image_and_label(raw: dict, name: str) -> Optional[dict]:
            found.update(k for k in raw if not k.startswith("__"))
            ext = image_key(raw)
            if ext is None:
                return self.skips("missing image", name)
            try:
                label = labels({k: member_bytes(raw[k]) for k in labels.keys() if k in raw})
            except BadLabel as err:
                return self.skips("bad label", f"{name}: {err}")
            if label is None:
                return self.skips("missing label", name)
            return {"image": raw[ext], "label": label}

        index = index_shards(spec, key, image_and_label, self.skips)
        self.shards, self._spool = index.shards, index.spool  # the spool lives as long as the dataset
        self.items = [k["image"] for k in index.kept]  # MemberRef of each sample's image
        self.targets: list[int] = [k["label"] for k in index.kept]
        if not self.targets:
            keys = ", ".join(f"{k} ({n})" for k, n in sorted(found.items())) or "none"
            raise BadValue(f"{key}={spec}: no labelled sample (keys found: {keys}); fine-tuning needs .cls "
                             "(an integer or a class name) or .txt class names, with class names listed in "
                             "classes.json beside the shards or data.classes=")
        if self.skips.counts and int(os.environ.get("RANK", "0")) == 0:
            print(f"[data] {key}: {len(self.items)} samples from {len(self.shards)} shards; skipped while "
                  f"indexing: {dict(self.skips.counts)}", flush=True)
        self.skips.warn = True  # undecodable images met while training are reported as they come
        self._read = MemberReader()
        self._undecodable = multiprocessing.Value("q", 0)  # shared with the DataLoader's workers

    def skipped_samples(self) -> int:
        """Undecodable images met so far by this process and its DataLoader workers (each was replaced)."""
        return self._undecodable.value

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        """The image and label at `index`; an image that does not decode is counted and the next decodable
        sample stands in for it (its own label)."""
        from mimkit.data.sources import DECODE_ERRORS, decode_image

        for i in (j % len(self.items) for j in range(index, index + MAX_STAND_INS)):
            try:
                image = decode_image(self._read(self.items[i]))
            except DECODE_ERRORS as err:
                self.skips("undecodable image", f"sample {i} ({self.items[i].path}): {type(err).__name__}: {err}")
                with self._undecodable.get_lock():
                    self._undecodable.value += 1
                continue
            return (self.transform(image) if self.transform else image), self.targets[i]
        raise RuntimeError(f"{MAX_STAND_INS} undecodable images in a row from sample {index}: "
                           f"skipped so far {dict(self.skips.counts)}")


def is_shard_spec(spec: str) -> bool:
    """True when `spec` names tar shards (a .tar file or pattern, or a folder holding .tar files);
    otherwise it is read as an ImageFolder."""
    if ".tar" in spec or ".tgz" in spec or "::" in spec or spec.startswith("pipe:") or "://" in spec:
        return True
    return os.path.isdir(spec) and any(name.endswith((".tar", ".tar.gz", ".tgz")) for name in os.listdir(spec))


def labelled_images(spec: str, transform: Optional[Callable] = None, classes: str = "",
                    key: str = "data") -> torch.utils.data.Dataset:
    """An ImageFolder (`spec/<class>/*.jpg`) or tar shards (`is_shard_spec`), with `targets`. ``key``: the
    config key named in errors."""
    if is_shard_spec(spec):
        return TarShardImages(spec, transform, classes, key=key)
    from torchvision.datasets import ImageFolder

    return ImageFolder(spec, transform=transform)


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 0.875,
                   interpolation: str = "bicubic") -> Callable:
    """PIL image -> normalised [3, S, S]: resized to S / crop_pct, centre crop S (timm's evaluation view,
    the one DINO's k-NN uses)."""
    from timm.data import create_transform

    return create_transform(image_size, is_training=False, interpolation=interpolation, crop_pct=crop_pct,
                            mean=tuple(mean), std=tuple(std))
