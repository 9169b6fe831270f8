"""The `FinetuneConfig` schema: `finetune --config FILE [dotted.key=value ...]` (see configs/finetune/).

`task` picks the task from the table in `tasks.py` (classification, segmentation, ...); `options` is
validated against that task's own config dataclass (`resolve_task`, at parse time), so a run's
config.yaml holds the settings of its task only. The sections below are shared by every task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from mimkit.distributed.loop import FaultConfig


@dataclass
class RunConfig:
    root: str = "runs"
    name: str = "finetune"
    seed: int = 0
    resume: str = "auto"  # auto (latest verified, else the newest that verifies) | strict (latest or stop) | none | path to a checkpoint folder
    log_every: int = 20  # steps
    save_every: int = 1  # epochs; 0: only at the end


@dataclass
class ModelConfig:
    init: str = ""  # mimkit export folder, official BEiT / BEiT v2 / MAE / MILAN file, timm state dict; "" = scratch
    preset: str = "vit_base_patch16"  # mimkit.models.vit preset: a scratch run's network; for a checkpoint without mimkit.json, the fields its shapes do not tell
    embed_dim: Optional[int] = None  # width; None: the checkpoint's (read from its shapes) or the preset's
    depth: Optional[int] = None  # blocks; None: the checkpoint's or the preset's
    patch_size: Optional[int] = None  # None: the checkpoint's or the preset's
    num_heads: Optional[int] = None  # None: a rel-pos table's columns, else the preset's at its width, else width / 64 (ViT-H: 16)
    img_size: Optional[int] = None  # None: the export's / preset's
    global_pool: str = "avg"  # avg (mean of patch tokens + LayerNorm, BEiT / MAE fine-tuning) | token (CLS)
    drop_path: float = 0.1
    rel_pos: Optional[str] = None  # BEiT fine-tuning turns a shared table into per-block tables: "block"
    head_init_scale: float = 0.001  # BEiT / MAE scale the fresh head's weights down


@dataclass
class DataConfig:
    format: str = "imagefolder"  # imagefolder (ROOT/train/<wnid>/*.JPEG, ROOT/val/...) | shards (image + .cls / class-name .txt) | ade (segmentation)
    root: str = ""  # imagefolder: the folder holding train/ and val/; ade: ADEChallengeData2016
    train_shards: str = ""  # shards: as pretraining's data.shards (brace patterns, folders, .tar.gz, pipe:, s3:// ...)
    val_shards: str = ""
    classes: str = ""  # class-name labels: a classes file (JSON list / object, one name a line); "": classes.json beside the shards
    num_classes: int = 1000
    label_fraction: float = 1.0  # keep this fraction of training labels, class-balanced (few-label runs)
    batch_size: int = 1024  # global, split across processes (same batches on any number of processes)
    eval_batch_size: int = 256  # global
    num_workers: int = 8
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    interpolation: str = "bicubic"
    crop_pct: float = 0.875  # eval: resize to size / crop_pct, centre crop


@dataclass
class AugmentConfig:
    enabled: bool = True  # False: the eval transform for training too (tests, probes)
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip: float = 0.5
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1-mmax9"  # timm RandAugment; mmax9: at level 10 inc posterize asks PIL for 0 bits (an error in current Pillow)
    color_jitter: Optional[float] = None
    reprob: float = 0.25  # random erasing
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1


@dataclass
class OptimConfig:
    epochs: int = 100
    warmup_epochs: float = 5.0
    warmup_steps: int = 0  # > 0: warmup in steps, instead of warmup_epochs (iteration-based recipes)
    schedule: str = "cosine"  # cosine | poly (lr decays as (1 - t)^poly_power to min_lr: mmsegmentation) | step (x gamma at each milestone: Detectron2)
    poly_power: float = 1.0
    milestones: list[float] = field(default_factory=lambda: [0.889, 0.963])  # step: fractions of the run where lr x gamma
    gamma: float = 0.1  # step: the lr factor at each milestone
    lr: float = 4e-3  # the peak lr for `base_batch_size` samples (BEiT 4e-3, BEiT v2 5e-4, MAE 5e-4 x b/256)
    base_batch_size: int = 1024  # lr scales by batch_size / base_batch_size; 0: lr as given
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: Optional[float] = 0.65  # None: no layer-wise decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad: Optional[float] = None
    max_steps: int = 0  # > 0: stop after this many steps (smoke runs, equal-budget comparisons)


@dataclass
class FinetuneConfig:
    task: str = "classification"  # classification | segmentation | detection (finetune/tasks.py)
    options: Any = None  # the task's own section (its dataclass in the task's file); None: its defaults
    mode: str = "finetune"  # finetune | linprobe (frozen encoder, BatchNorm without affine + linear)
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: float = 0.0  # > 0: keep an EMA of the weights with this decay and evaluate it too
    precision: str = "auto"  # auto (bf16 where a GPU is, else fp32) | bf16 | fp32 | fp16 (a GPU; dynamic loss scaling)
    cpu: bool = False  # force CPU (tests)
    compile: bool = False  # torch.compile the network in place (checkpoint keys unchanged); off until measured
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: graph capture without code generation)
    eval_every: int = 1  # epochs
    debug: FaultConfig = field(default_factory=FaultConfig)  # fault knobs (tests); ranks: process indices


MODES = ("finetune", "linprobe")
SCHEDULES = ("cosine", "poly", "step")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def load_finetune_config(config_file=None, overrides=()) -> FinetuneConfig:
    """`load_config` plus the task's `options` section (what `finetune --config ...` parses)."""
    from mimkit.config import load_config
    from mimkit.finetune.tasks import resolve_task

    return resolve_task(load_config(FinetuneConfig, config_file, overrides))
