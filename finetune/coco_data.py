"""COCO instances for detection fine-tuning: the real layout (`train2017/`, `val2017/`,
`annotations/instances_{train,val}2017.json`, or any image folder + instances json), polygons, RLE and
uncompressed RLE masks (all through pycocotools), large-scale jitter, and the category-id mapping.

Labels: torchvision's detection heads keep 0 for background, so the k-th category of the json in id order
is label k + 1; :class:`Categories` maps original ids (with gaps: COCO's run 1..90 for 80 classes) to labels
and back, which evaluation needs to score against the json.

Training (ViTDet's large-scale jitter): resize by a random factor of 0.1-2.0 so the image fits a square of
that factor times `size`, crop a random `size` x `size` window where it is larger, flip with probability
0.5, pad to `size` x `size`. Boxes are recomputed from the cropped masks (a cropped box is not the box of
the cropped object) and instances left without pixels are dropped. Crowd regions (`iscrowd: 1`) never
become targets; images with no non-crowd annotation are dropped (Detectron2's default) unless `keep_empty`.
The randomness of a sample is drawn from (seed, epoch, image index): the same on any number of processes
and data workers, and again after a mid-epoch resume.

Evaluation: the longest side resized to `size`, padded to `size` x `size`; no masks are decoded (COCOeval
reads the ground truth from the json), every image is kept.

A sample is (image [3, size, size] float, normalised, zero beyond the valid region; target dict):
`boxes` [N, 4] float (x1, y1, x2, y2 in the input's pixels), `labels` [N] long (1..K), `masks` [N, size, size]
uint8 (training), `image_id` int, `size` (valid h, w), `orig_size` (h, w of the file), `scale` (input pixels
per original pixel, evaluation).
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def read_coco(ann_file: str | os.PathLike) -> COCO:
    """pycocotools' index of an instances json (its progress prints silenced)."""
    if not Path(ann_file).is_file():
        raise FileNotFoundError(f"no COCO annotation file at {ann_file}")
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


@dataclass(frozen=True)
class Categories:
    """The json's categories in id order: label k + 1 <-> ids[k] (label 0 is the background)."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_coco(cls, coco: COCO) -> "Categories":
        cats = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
        if not cats:
            raise ValueError("the annotation file lists no categories")
        return cls(tuple(int(c["id"]) for c in cats), tuple(str(c["name"]) for c in cats))

    def __len__(self) -> int:
        return len(self.ids)

    def label(self, category_id: int) -> int:
        return self.ids.index(category_id) + 1

    def category_id(self, label: int) -> int:
        return self.ids[label - 1]

    def name(self, label: int) -> str:
        return self.names[label - 1]


def _normalise(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL image (at most size x size) -> [3, size, size] float normalised, zero-padded right and bottom."""
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    array = (array - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    out = torch.zeros(3, size, size)
    out[:, : array.shape[1], : array.shape[2]] = array
    return out


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """[N, H, W] -> [N, 4] (x1, y1, x2, y2) enclosing each mask's pixels (pixel edges, so x2 - x1 = width)."""
    if masks.shape[0] == 0:
        return torch.zeros(0, 4)
    masks = masks.bool()
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # [N, H], [N, W]
    h_idx = torch.arange(masks.shape[1]).expand_as(rows)
    w_idx = torch.arange(masks.shape[2]).expand_as(cols)
    y1 = torch.where(rows, h_idx, masks.shape[1]).min(dim=1).values
    y2 = torch.where(rows, h_idx, -1).max(dim=1).values + 1
    x1 = torch.where(cols, w_idx, masks.shape[2]).min(dim=1).values
    x2 = torch.where(cols, w_idx, -1).max(dim=1).values + 1
    return torch.stack([x1, y1, x2, y2], dim=1).float()


def jitter_window(rng: np.random.Generator, height: int, width: int, size: int,
                  scale_range: Sequence[float]) -> tuple[int, int, int, int, int, int]:
    """Large-scale jitter's geometry: (scaled h, scaled w, crop top, crop left, crop h, crop w) in scaled pixels."""
    factor = rng.uniform(scale_range[0], scale_range[1])
    scale = min(size * factor / height, size * factor / width)  # fits a (factor * size) square
    sh, sw = max(1, round(height * scale)), max(1, round(width * scale))
    top = int(rng.integers(0, sh - size + 1)) if sh > size else 0
    left = int(rng.integers(0, sw - size + 1)) if sw > size else 0
    return sh, sw, top, left, min(sh, size), min(sw, size)


class CocoInstances(torch.utils.data.Dataset):
    """One split of a COCO-style instances dataset (see the module docstring)."""

    def __init__(self, image_dir: str | os.PathLike, ann_file: str | os.PathLike, *, train: bool, size: int,
                 mean: Sequence[float], std: Sequence[float], scale_range: Sequence[float] = (0.1, 2.0),
                 hflip: float = 0.5, keep_empty: bool = False, seed: int = 0, limit: int = 0):
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"no image folder at {self.image_dir}")
        self.coco = read_coco(ann_file)
        self.categories = Categories.from_coco(self.coco)
        self.train, self.size, self.mean, self.std = train, size, list(mean), list(std)
        self.scale_range, self.hflip, self.seed, self.epoch = tuple(scale_range), hflip, seed, 0
        ids = sorted(self.coco.imgs)
        if train and not keep_empty:
            ids = [i for i in ids if self._instances(i)]
        if not ids:
            raise ValueError(f"{ann_file}: no images" + (" with annotations" if train and not keep_empty else ""))
        self.image_ids = ids[:limit] if limit > 0 else ids  # limit: the first images in id order (quick runs)

    def __len__(self) -> int:
        return len(self.image_ids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _instances(self, image_id: int) -> list[dict]:
        """The annotations that become targets: not crowd, with a category the json lists."""
        return [a for a in self.coco.imgToAnns[image_id]
                if not a.get("iscrowd", 0) and a["category_id"] in self.categories.ids]

    def load_image(self, image_id: int) -> Image.Image:
        info = self.coco.imgs[image_id]
        with Image.open(self.image_dir / info["file_name"]) as image:
            return image.convert("RGB")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image_id = self.image_ids[index]
        image = self.load_image(image_id)
        if self.train:
            return self._train_sample(index, image_id, image)
        return self._eval_sample(image_id, image)

    def _eval_sample(self, image_id: int, image: Image.Image) -> tuple[torch.Tensor, dict[str, Any]]:
        w, h = image.size
        scale = self.size / max(h, w)
        sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
        resized = image.resize((sw, sh), Image.BILINEAR) if (sh, sw) != (h, w) else image
        target = {"image_id": image_id, "size": torch.tensor([sh, sw]), "orig_size": torch.tensor([h, w]),
                  "scale": torch.tensor([sh / h, sw / w])}
        return _normalise(resized, self.size, self.mean, self.std), target

    def _train_sample(self, index: int, image_id: int, image: Image.Image) -> tuple[torch.Tensor, dict[str, Any]]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        w, h = image.size
        sh, sw, top, left, ch, cw = jitter_window(rng, h, w, self.size, self.scale_range)
        sy, sx = sh / h, sw / w
        # Only the crop is resampled: PIL maps the output pixels onto the source box (antialiased when shrinking).
        crop = image.resize((cw, ch), Image.BILINEAR, box=(left / sx, top / sy, (left + cw) / sx, (top + ch) / sy))
        anns = self._instances(image_id)
        masks = torch.zeros(len(anns), ch, cw, dtype=torch.uint8)
        if anns:
            # Nearest-neighbour resize of the masks onto the same crop: the source pixel under each output centre.
            rows = ((top + torch.arange(ch) + 0.5) / sy).long().clamp(max=h - 1)
            cols = ((left + torch.arange(cw) + 0.5) / sx).long().clamp(max=w - 1)
            full = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns]))  # [N, h, w]
            masks = full[:, rows][:, :, cols]
        labels = torch.tensor([self.categories.label(a["category_id"]) for a in anns], dtype=torch.long)
        if rng.random() < self.hflip:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            masks = masks.flip(-1)
        keep = masks.flatten(1).bool().any(dim=1)
        masks, labels = masks[keep], labels[keep]
        padded = torch.zeros(masks.shape[0], self.size, self.size, dtype=torch.uint8)
        padded[:, :ch, :cw] = masks
        target = {"boxes": boxes_from_masks(masks), "labels": labels, "masks": padded, "image_id": image_id,
                  "size": torch.tensor([ch, cw]), "orig_size": torch.tensor([h, w])}
        return _normalise(crop, self.size, self.mean, self.std), target


def collate(samples: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """(images [B, 3, S, S], [target dict per image])."""
    return torch.stack([s[0] for s in samples]), [s[1] for s in samples]


@dataclass
class CocoLayout:
    """Where a split's images and annotations are, relative to the data root (COCO 2017 by default)."""

    train_images: str = "train2017"
    train_annotations: str = "annotations/instances_train2017.json"
    val_images: str = "val2017"
    val_annotations: str = "annotations/instances_val2017.json"

    def paths(self, root: str | os.PathLike, split: str) -> tuple[Path, Path]:
        root = Path(root)
        images, annotations = getattr(self, f"{split}_images"), getattr(self, f"{split}_annotations")
        return root / images, root / annotations


def check_layout(root: str, layout: CocoLayout, where: str = "data.root") -> Optional[str]:
    """A one-line complaint about a missing folder or file (naming the key), or None."""
    if not root:
        return f"{where} is empty: set it to the folder holding train2017/, val2017/ and annotations/"
    for split in ("train", "val"):
        images, annotations = layout.paths(root, split)
        if not images.is_dir():
            return f"{where}={root}: no image folder {images}"
        if not annotations.is_file():
            return f"{where}={root}: no annotation file {annotations}"
    return None
