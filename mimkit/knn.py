"""Weighted k-NN classification of frozen encoder features (DINO's protocol), and `mimkit knn`.

Every image of a labelled train set and a labelled val set goes through the encoder once (eval mode,
no grad, resize + centre crop); its feature is the mean of the patch tokens (how fine-tuning pools)
or the CLS token, after the encoder's final norm where it has one. Each val image's k nearest train
images by cosine similarity vote for their class with weight exp(similarity / T); the class scores
are the sums of those weights, and top-1 / top-5 are read from them. k = 20 and T = 0.07 are DINO's.

Distributed: each rank encodes a contiguous slice of each set (padded to the same length, so every
rank runs the same number of forwards, as ZeRO-3 needs), the train features are all-gathered, each
rank classifies its own val slice, and the counts are summed. The result equals one process's.

    mimkit knn runs/mae/export --train DIR_OR_SHARDS --val DIR_OR_SHARDS [--k 20] [--out knn.json]
    torchrun --nproc_per_node 2 -m mimkit knn runs/mae/export --train ... --val ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mimkit.config import ConfigError
from mimkit.metrics import topk_correct

FEATURES = ("mean", "cls")


@dataclass
class KnnConfig:
    """The `knn` section of pretraining (and the options of `mimkit knn`)."""

    every: int = 0  # evaluate every N optimizer steps, at the start and at the last step (0: off); pretraining only
    train: str = ""  # labelled images the neighbours come from: an ImageFolder folder, or tar shards (.tar pattern / folder)
    val: str = ""  # labelled images classified: an ImageFolder folder or tar shards
    k: int = 20  # neighbours (DINO)
    temperature: float = 0.07  # votes weighted by exp(cosine / temperature) (DINO)
    feature: str = "mean"  # mean (of the patch tokens: how fine-tuning pools) | cls
    image_size: int = 0  # 0: the encoder's input size
    crop_pct: float = 0.875  # resize to image_size / crop_pct, then centre crop
    batch_size: int = 64  # images per forward, per rank
    num_workers: int = 2  # DataLoader workers per rank (0: in the training process)


def check_knn_config(cfg: KnnConfig, name: Callable[[str], str] = lambda f: f"knn.{f}",
                     encoder_size: Optional[int] = None, has_cls: bool = True) -> None:
    """Raise ConfigError naming the first bad key and its value (before any work starts). Paths are
    checked to exist; `encoder_size` (a fixed input size) and `has_cls` are what the encoder accepts."""
    checks = [("every", cfg.every >= 0, "must be >= 0"), ("k", cfg.k >= 1, "must be >= 1"),
              ("temperature", cfg.temperature > 0, "must be > 0"),
              ("feature", cfg.feature in FEATURES, f"must be one of {', '.join(FEATURES)}"),
              ("feature", cfg.feature != "cls" or has_cls, "needs an encoder with a class token"),
              ("image_size", cfg.image_size >= 0, "must be >= 0 (0: the encoder's)"),
              ("image_size", not (cfg.image_size and encoder_size) or cfg.image_size == encoder_size,
               f"must be 0 or the encoder's input size {encoder_size}"),
              ("crop_pct", 0 < cfg.crop_pct <= 1, "must be in (0, 1]"),
              ("batch_size", cfg.batch_size >= 1, "must be >= 1"), ("num_workers", cfg.num_workers >= 0, "must be >= 0")]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"{name(key)}={getattr(cfg, key)!r}: {why}")
    for key in ("train", "val"):
        spec = getattr(cfg, key)
        if not spec:
            raise ConfigError(f"{name(key)} is empty: set a labelled ImageFolder folder or tar shards")
        if "::" not in spec and "{" not in spec and "*" not in spec and not os.path.exists(spec):
            raise ConfigError(f"{name(key)}={spec!r}: no such file or folder")
    from mimkit.data.labelled import is_shard_spec

    if is_shard_spec(cfg.train) != is_shard_spec(cfg.val):  # ImageFolder labels are sorted folder names, shards' their .cls
        raise ConfigError(f"{name('train')}={cfg.train!r} and {name('val')}={cfg.val!r}: one is an ImageFolder, "
                          f"the other tar shards; their labels need not agree: use one format for both")


# ---- the classifier -------------------------------------------------------------------------------
def knn_class_scores(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
                     num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """[Q, C] class scores: per query, the sum over its k most cosine-similar train features of
    exp(similarity / temperature), each added to the neighbour's class."""
    train = F.normalize(train_features.float(), dim=1)
    k = min(k, train.shape[0])
    scores = []
    for start in range(0, query_features.shape[0], chunk):  # [chunk, N] similarities at a time
        query = F.normalize(query_features[start:start + chunk].float(), dim=1)
        sim, index = (query @ train.T).topk(k, dim=1)
        votes = torch.zeros(query.shape[0], num_classes, device=query.device)
        scores.append(votes.scatter_add_(1, train_labels[index], (sim / temperature).exp()))
    return torch.cat(scores) if scores else torch.zeros(0, num_classes, device=train.device)


# ---- features ---------------------------------------------------------------------------------------
def pooled_features(encoder: torch.nn.Module, images: torch.Tensor, feature: str) -> torch.Tensor:
    """[B, D] float32: the mean of the patch tokens, or the CLS token, of `encoder.forward_features`."""
    tokens = encoder.forward_features(images)
    pooled = tokens[:, encoder.num_prefix_tokens:].mean(dim=1) if feature == "mean" else tokens[:, 0]
    return pooled.float()


def rank_slice(n: int, rank: int, world: int) -> tuple[list[int], int]:
    """(indices, how many are real): rank's contiguous share of range(n), padded with index n - 1 to
    ceil(n / world) entries, so every rank runs the same forwards and gathers the same shape."""
    per = -(-n // world)
    return [min(i, n - 1) for i in range(rank * per, (rank + 1) * per)], max(0, min(n, (rank + 1) * per) - rank * per)


@torch.no_grad()
def encode_slice(encoder: torch.nn.Module, dataset, indices: list[int], cfg: KnnConfig, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """[len(indices), D] features of dataset[indices] (the DataLoader keeps its own seed, so the
    caller's RNG stream is untouched)."""
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=cfg.batch_size,
                                         num_workers=cfg.num_workers, generator=torch.Generator(),
                                         pin_memory=device.type == "cuda")
    out = [pooled_features(encoder, images.to(device, dtype, non_blocking=True), cfg.feature) for images, _ in loader]
    return torch.cat(out)


def _rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class KnnEvaluator:
    """The two labelled sets, opened once; `__call__(encoder)` (collective) encodes and classifies."""

    def __init__(self, cfg: KnnConfig, image_size: int, mean: Sequence[float], std: Sequence[float],
                 interpolation: str = "bicubic", name: Callable[[str], str] = lambda f: f"knn.{f}"):
        from mimkit.data.labelled import eval_transform, labelled_images

        self.cfg = cfg
        transform = eval_transform(cfg.image_size or image_size, mean, std, cfg.crop_pct, interpolation)
        sets = []
        for key in ("train", "val"):
            spec = getattr(cfg, key)
            try:
                sets.append(labelled_images(spec, transform))
            except (OSError, ValueError) as err:  # no class folders, a missing or unreadable shard
                raise ConfigError(f"{name(key)}={spec!r}: {err}") from None
            if len(sets[-1]) == 0:
                raise ConfigError(f"{name(key)}={spec!r} holds no labelled images")
        self.train_set, self.val_set = sets
        train_classes = getattr(self.train_set, "class_to_idx", None)
        val_classes = getattr(self.val_set, "class_to_idx", None)
        if train_classes is not None and val_classes is not None and train_classes != val_classes:
            raise ConfigError(f"{name('train')} and {name('val')} have different class folders: "
                              f"{sorted(train_classes)} vs {sorted(val_classes)}")
        self.train_labels = torch.tensor(self.train_set.targets, dtype=torch.long)
        self.val_labels = torch.tensor(self.val_set.targets, dtype=torch.long)
        self.num_classes = int(max(self.train_labels.max(), self.val_labels.max())) + 1

    def __call__(self, encoder: torch.nn.Module, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> dict[str, float]:
        """{"knn_top1", "knn_top5"} in percent and "knn_seconds", the same on every rank. Runs the
        encoder in eval mode and puts it back in the mode it was in."""
        started = time.perf_counter()
        device = torch.device(device)
        rank, world = _world()
        was_training = encoder.training
        encoder.eval()
        try:
            mine = encode_slice(encoder, self.train_set, rank_slice(len(self.train_set), rank, world)[0], self.cfg,
                                device, dtype)
            val_index, real = rank_slice(len(self.val_set), rank, world)
            val = encode_slice(encoder, self.val_set, val_index, self.cfg, device, dtype)
        finally:
            encoder.train(was_training)
        if world > 1:
            parts = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(parts, mine)
            train = torch.cat(parts)[:len(self.train_set)]
        else:
            train = mine[:len(self.train_set)]
        labels = self.val_labels[val_index[:real]].to(device)
        scores = knn_class_scores(train, self.train_labels.to(device), val[:real], self.num_classes,
                                  self.cfg.k, self.cfg.temperature)
        hits = topk_correct(scores, labels, (1, 5))
        counts = torch.tensor([hits[1], hits[5], real], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(counts)
        top1, top5, total = counts.tolist()
        return {"knn_top1": 100.0 * top1 / total, "knn_top5": 100.0 * top5 / total,
                "knn_seconds": round(time.perf_counter() - started, 3)}

    def describe(self) -> str:
        return (f"{len(self.val_set)} val / {len(self.train_set)} train images, {self.num_classes} classes, "
                f"k {self.cfg.k}, T {self.cfg.temperature}, {self.cfg.feature} feature")


# ---- `mimkit knn` -----------------------------------------------------------------------------------
def load_encoder(path: str, preset_name: str, image_size: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(encoder, pixel normalisation) from a mimkit export (its architecture and normalisation) or any
    layout `mimkit.checkpoint.load` reads (the architecture is `preset_name`, ImageNet normalisation)."""
    from mimkit.checkpoint.export_format import IMAGENET_MEAN, IMAGENET_STD, is_export
    from mimkit.checkpoint.load import load_checkpoint_into_vit, load_vit_export
    from mimkit.models.vit import VisionTransformer, preset

    size = {"img_size": image_size} if image_size else {}
    if is_export(path):
        encoder, info = load_vit_export(path, num_classes=0, **size)
        return encoder, {**info, "image_size": encoder.cfg.img_size}
    encoder = VisionTransformer(preset(preset_name, num_classes=0, **size))
    report = load_checkpoint_into_vit(encoder, path, verbose=False)
    if report.missing:
        print(f"mimkit knn: {len(report.missing)} encoder tensors not in {path} stay at their init: "
              f"{', '.join(report.missing[:4])}{' ...' if len(report.missing) > 4 else ''}", file=sys.stderr)
    return encoder, {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "image_size": encoder.cfg.img_size,
                     "interpolation": "bicubic"}


FLAG_HELP = {"train": "labelled images the neighbours come from: an ImageFolder folder or tar shards with .cls",
             "val": "labelled images classified (the same format as --train)", "k": "neighbours",
             "temperature": "votes weighted by exp(cosine / temperature)",
             "feature": "mean (of the patch tokens) or cls", "image_size": "input size (0: the encoder's)",
             "crop_pct": "resize to image_size / crop_pct, then centre crop", "batch_size": "images per forward",
             "num_workers": "DataLoader workers"}


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, KnnConfig]:
    from mimkit.models.vit import PRESETS

    parser = argparse.ArgumentParser(prog="mimkit knn", description="Weighted k-NN accuracy of an encoder's "
                                     "features (DINO's protocol: cosine, k 20, T 0.07) on a labelled val set.")
    parser.add_argument("checkpoint", help="a mimkit export folder, or a checkpoint file of a layout "
                        "mimkit.checkpoint.load reads (its architecture: --preset)")
    parser.add_argument("--preset", default="vit_base_patch16", choices=sorted(PRESETS),
                        help="architecture of a checkpoint that is not a mimkit export (default: vit_base_patch16)")
    parser.add_argument("--out", default="", help="also write the result to this JSON file")
    defaults = KnnConfig()
    for f in fields(KnnConfig):
        if f.name != "every":
            default = getattr(defaults, f.name)
            parser.add_argument(_flag(f.name), type=type(default), default=default, required=f.name in ("train", "val"),
                                help=f"{FLAG_HELP[f.name]}{'' if f.name in ('train', 'val') else f' (default: {default})'}")
    args = parser.parse_args(argv)
    return args, KnnConfig(**{f.name: getattr(args, f.name) for f in fields(KnnConfig) if f.name != "every"})


def main(argv: Optional[list[str]] = None) -> int:
    args, cfg = parse_args(argv)
    try:
        check_knn_config(cfg, _flag)
        if not os.path.exists(args.checkpoint):
            raise ConfigError(f"checkpoint {args.checkpoint!r}: no such file or folder")
    except ConfigError as err:  # the same on every rank: rank 0 says it
        if _rank_from_env() == 0:
            print(f"mimkit knn: {err}", file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = _world()[0]
    try:
        encoder, norm = load_encoder(args.checkpoint, args.preset, cfg.image_size)
        if cfg.feature == "cls" and encoder.cls_token is None:
            raise ConfigError(f"--feature=cls: {args.checkpoint} has no class token")
        evaluator = KnnEvaluator(cfg, norm["image_size"], norm["mean"], norm["std"], norm["interpolation"] or "bicubic",
                                 name=_flag)
    except (ConfigError, ValueError, FileNotFoundError) as err:  # a user's file or value: one line
        if rank == 0:
            print(f"mimkit knn: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    result = evaluator(encoder.to(device), device)
    if rank == 0:
        print(f"k-NN {args.checkpoint}: top-1 {result['knn_top1']:.2f} %, top-5 {result['knn_top5']:.2f} % "
              f"({evaluator.describe()}; {result['knn_seconds']:.1f} s)", flush=True)
        if args.out:
            record = {"checkpoint": str(args.checkpoint), **{f.name: getattr(cfg, f.name) for f in fields(cfg)
                                                             if f.name != "every"},
                      "image_size": norm["image_size"], "num_train": len(evaluator.train_set),
                      "num_val": len(evaluator.val_set), "num_classes": evaluator.num_classes, **result}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
