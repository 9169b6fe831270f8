"""Semantic-segmentation samples: the ADE20K folder layout or tar shards, labels, and mmsegmentation's
training pipeline, seeded per sample.

    ROOT/images/{training,validation}/NAME.jpg        ROOT = ADEChallengeData2016
    ROOT/annotations/{training,validation}/NAME.png   8-bit class ids, 0 = "other"
    shards: KEY.jpg + KEY.seg.png (the same PNG bytes), e.g. `mimkit shards ade ROOT --split training`

Labels: with `reduce_zero_label` (ADE20K) 0 becomes 255 (ignored) and k becomes k - 1.
Training: resize by a random ratio of `scale` keeping the aspect ratio, random crop (retried up to 10
times while one class covers more than `cat_max_ratio` of the labelled pixels), flip, photometric
distortion (brightness, contrast, saturation, hue, each with probability 1/2), normalise, pad to the crop
with 0 (image) and 255 (label). Each sample's randomness is drawn from (seed, epoch, sample index), so it
does not depend on the process, the worker or a resume. Evaluation: the image resized to `scale`
keeping the aspect ratio, the label at its original size.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
from PIL import Image

from mimkit.data.sources import MemberReader, MemberRef, ShardIndex, image_key, index_shards
from mimkit.errors import BadValue

IGNORE = 255
ADE_SPLITS = {"train": "training", "val": "validation"}
CROP_TRIES = 10  # mmsegmentation's RandomCrop retries for cat_max_ratio


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """ADE20K ids -> training labels: 0 ("other") -> 255, k -> k - 1 (and 255 stays ignored)."""
    label = label.astype(np.int64)
    out = label - 1
    out[(label == 0) | (label == IGNORE)] = IGNORE
    return out.astype(np.uint8)


def restore_zero_label(label: np.ndarray) -> np.ndarray:
    """The inverse of :func:`reduce_zero_label`: 255 -> 0, k -> k + 1 (a prediction saved as ADE ids)."""
    label = label.astype(np.int64)
    out = label + 1
    out[label == IGNORE] = 0
    return out.astype(np.uint8)


# ---- sources ---------------------------------------------------------------------------------------


Source = Union[Path, MemberRef]  # a file, or a tar member (`mimkit.data.sources.index_shards`)


def ade_pairs(root: str, split: str) -> list[tuple[Path, Path]]:
    """(image, annotation) files of one split of the ADE20K layout, matched by name."""
    folder = ADE_SPLITS[split]
    images, annotations = Path(root) / "images" / folder, Path(root) / "annotations" / folder
    for path in (images, annotations):
        if not path.is_dir():
            raise FileNotFoundError(f"data.root: {path} is not a folder (expected ROOT/images/{folder}/*.jpg and "
                                    f"ROOT/annotations/{folder}/*.png, ROOT = ADEChallengeData2016)")
    labels = {p.stem: p for p in annotations.glob("*.png")}
    pairs = [(p, labels[p.stem]) for p in sorted(images.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png")
             and p.stem in labels]
    if not pairs:
        raise FileNotFoundError(f"data.root: no image with an annotation in {images} / {annotations}")
    return pairs


def shard_pairs(spec: str, key: str = "data.train_shards") -> tuple[ShardIndex, list[tuple[Source, Source]]]:
    """(index, [(image member, label member)]) of tar shards holding KEY.jpg + KEY.seg.png, read by the
    shared shard reader (local, .tar.gz, pipe:, URLs; truncated shards keep their whole samples)."""
    from mimkit.data.stream import SkipCounter

    skips = SkipCounter(warn=False)

    def image_and_label(raw: dict, name: str) -> Optional[dict]:
        ext = image_key(raw)
        if ext is None:
            return skips("missing image", name)
        if "seg.png" not in raw:
            return skips("missing label", f"{name}: no .seg.png")
        return {"image": raw[ext], "label": raw["seg.png"]}

    index = index_shards(spec, key, image_and_label, skips)
    if not index.kept:
        raise BadValue(f"{key}={spec}: no .jpg + .seg.png samples in these shards")
    if skips.counts and int(os.environ.get("RANK", "0")) == 0:
        print(f"[data] {key}: {len(index.kept)} samples from {len(index.shards)} shards; skipped while indexing: "
              f"{dict(skips.counts)}", flush=True)
    return index, [(k["image"], k["label"]) for k in index.kept]


# ---- the pipeline ------------------------------------------------------------------------------------
@dataclass
class SegPipeline:
    """What the sample transforms need (from the task's options and the run's data section)."""

    crop: int
    scale: Sequence[int]  # (long side, short side) at ratio 1: (2048, 512) for ADE20K
    ratio_range: Sequence[float]
    cat_max_ratio: float
    hflip: float
    photometric: bool
    reduce_zero_label: bool
    mean: Sequence[float]
    std: Sequence[float]


def rescale_size(width: int, height: int, scale: Sequence[float]) -> tuple[int, int]:
    """(w, h) scaled so that the long side fits max(scale) and the short side min(scale), aspect kept."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return max(1, int(width * factor + 0.5)), max(1, int(height * factor + 0.5))


def random_crop_box(label: np.ndarray, crop: int, cat_max_ratio: float, rng: np.random.Generator):
    """(top, left) of a crop; retried while one class covers more than `cat_max_ratio` of its labelled pixels."""
    h, w = label.shape

    def draw():
        return int(rng.integers(0, max(h - crop, 0) + 1)), int(rng.integers(0, max(w - crop, 0) + 1))

    top, left = draw()
    if cat_max_ratio < 1.0:
        for _ in range(CROP_TRIES):
            values, counts = np.unique(label[top:top + crop, left:left + crop], return_counts=True)
            counts = counts[values != IGNORE]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            top, left = draw()
    return top, left


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmsegmentation's PhotoMetricDistortion on float RGB 0..255: brightness +-32, contrast x[0.5, 1.5]
    (before or after the colour changes, at random), saturation x[0.5, 1.5], hue +-18 of 180 degrees."""
    def contrast(x):
        return np.clip(x * rng.uniform(0.5, 1.5), 0, 255) if rng.integers(2) else x

    if rng.integers(2):
        image = np.clip(image + rng.uniform(-32, 32), 0, 255)
    contrast_first = bool(rng.integers(2))
    if contrast_first:
        image = contrast(image)
    saturate, shift_hue = bool(rng.integers(2)), bool(rng.integers(2))
    if saturate or shift_hue:
        hsv = rgb_to_hsv(image / 255.0)
        if saturate:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 1)
        if shift_hue:
            hsv[..., 0] = (hsv[..., 0] + rng.integers(-18, 19) / 180.0) % 1.0
        image = hsv_to_rgb(hsv) * 255.0
    if not contrast_first:
        image = contrast(image)
    return image


def normalise(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[H, W, 3] 0..255 -> [3, H, W] float32, (x / 255 - mean) / std."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def train_sample(image: Image.Image, label: np.ndarray, p: SegPipeline, rng: np.random.Generator):
    """One training crop: (image [3, crop, crop] float, label [crop, crop] long, 255 = ignored)."""
    ratio = rng.uniform(*p.ratio_range)
    size = rescale_size(*image.size, [s * ratio for s in p.scale])
    image = image.resize(size, Image.BILINEAR)
    label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    top, left = random_crop_box(label, p.crop, p.cat_max_ratio, rng)
    pixels = np.asarray(image, dtype=np.float32)[top:top + p.crop, left:left + p.crop]
    label = label[top:top + p.crop, left:left + p.crop]
    if rng.random() < p.hflip:
        pixels, label = pixels[:, ::-1], label[:, ::-1]
    if p.photometric:
        pixels = photometric_distortion(pixels, rng)
    x = normalise(pixels, p.mean, p.std)
    y = torch.from_numpy(np.array(label, dtype=np.int64))
    pad_h, pad_w = p.crop - x.shape[1], p.crop - x.shape[2]
    x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), value=0.0)
    y = torch.nn.functional.pad(y, (0, pad_w, 0, pad_h), value=IGNORE)
    return x, y


class SegmentationSamples(torch.utils.data.Dataset):
    """(image, label) pairs from files or tar members. Training items are dicts {"image", "label"} of the
    crop size; evaluation items {"image" (resized to `scale`), "label" (original size), "index"}.
    `set_epoch` reseeds the augmentation (the epoch lives in shared memory, so persistent workers see it)."""

    def __init__(self, pairs: list[tuple[Source, Source]], pipeline: SegPipeline, train: bool, seed: int = 0,
                 index: Optional[ShardIndex] = None):
        # `index` keeps the spool of streamed shards alive as long as the samples read from it
        self.pairs, self.pipeline, self.train, self.seed, self.index = pairs, pipeline, train, seed, index
        self._read = MemberReader()
        self._epoch = torch.zeros(1, dtype=torch.long).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def _bytes(self, source: Source) -> bytes:
        return source.read_bytes() if isinstance(source, Path) else self._read(source)

    def load(self, i: int) -> tuple[Image.Image, np.ndarray]:
        """The decoded image (RGB) and its training labels ([H, W] uint8, 255 = ignored)."""
        image_src, label_src = self.pairs[i]
        image = Image.open(io.BytesIO(self._bytes(image_src))).convert("RGB")
        label = np.asarray(Image.open(io.BytesIO(self._bytes(label_src))))
        if label.ndim != 2 or label.shape != (image.height, image.width):
            raise ValueError(f"sample {i}: label {label.shape} does not match image {image.height}x{image.width}")
        return image, (reduce_zero_label(label) if self.pipeline.reduce_zero_label else label.astype(np.uint8))

    def __getitem__(self, i: int) -> dict:
        image, label = self.load(i)
        if self.train:
            rng = np.random.default_rng([self.seed, int(self._epoch[0]), i])
            x, y = train_sample(image, label, self.pipeline, rng)
            return {"image": x, "label": y}
        size = rescale_size(*image.size, self.pipeline.scale)
        x = normalise(np.asarray(image.resize(size, Image.BILINEAR)), self.pipeline.mean, self.pipeline.std)
        return {"image": x, "label": torch.from_numpy(label.copy()).long(), "index": i}


def build_seg_dataset(fmt: str, root: str, shards: str, split: str, pipeline: SegPipeline,
                      seed: int) -> SegmentationSamples:
    if fmt == "ade":
        return SegmentationSamples(ade_pairs(root, split), pipeline, split == "train", seed)
    if fmt == "shards":
        index, pairs = shard_pairs(shards, "data.train_shards" if split == "train" else "data.val_shards")
        return SegmentationSamples(pairs, pipeline, split == "train", seed, index)
    raise ValueError(f"data.format must be 'ade' or 'shards' for segmentation, got {fmt!r}")


def single(batch: list) -> dict:
    """Evaluation collate: images differ in size, so a batch is one sample (mmsegmentation tests so too)."""
    (item,) = batch
    return item

