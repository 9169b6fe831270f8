"""The classification loop on accelerate: `accelerate launch finetune --config ...`, `python finetune ...`,
or `torchrun --nproc_per_node N finetune ...`.

Batches are global and split across processes (``split_batches``), so a run on N processes steps through
the same batches as on one. lr and weight decay follow a per-step warmup + cosine with each group's
``lr_scale`` (layer-wise decay). Checkpoints are safetensors (weights) + a tensors-only optimizer file read
back with ``weights_only=True`` + JSON, under ``RUN/checkpoints/epoch_XXXX`` with an atomic ``latest``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

from mimkit.config import parse_cli, save_config, to_dict
from mimkit.finetune.class_data import build_dataset, build_transform, dataset_targets, label_subset
from mimkit.finetune.classification import build_classifier
from mimkit.finetune.config import MODES, FinetuneConfig
from mimkit.finetune.metrics import evaluate
from mimkit.optim import apply_schedule, cosine_schedule, param_groups, resolve_lr
from mimkit.runlog import MetricsLogger, make_run_dir, progress


class ResumeError(RuntimeError):
    """A fine-tuning checkpoint that cannot be resumed from (missing, or holding more than tensors)."""


# ---- data ----------------------------------------------------------------------------------------
def build_loaders(cfg: FinetuneConfig, img_size: int, num_processes: int):
    if cfg.data.batch_size % num_processes or cfg.data.eval_batch_size % num_processes:
        raise ValueError(f"data.batch_size and data.eval_batch_size are global: make them multiples of the "
                         f"{num_processes} processes")
    train = build_dataset(cfg.data, "train", build_transform(cfg.data, cfg.aug, img_size, train=True))
    val = build_dataset(cfg.data, "val", build_transform(cfg.data, cfg.aug, img_size, train=False))
    if cfg.data.label_fraction < 1.0:
        train = torch.utils.data.Subset(train, label_subset(dataset_targets(train), cfg.data.label_fraction,
                                                            cfg.run.seed))
    generator = torch.Generator().manual_seed(cfg.run.seed)
    train_loader = torch.utils.data.DataLoader(train, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True,
                                               num_workers=cfg.data.num_workers, generator=generator,
                                               persistent_workers=cfg.data.num_workers > 0)
    val_loader = torch.utils.data.DataLoader(val, batch_size=cfg.data.eval_batch_size, shuffle=False,
                                             num_workers=cfg.data.num_workers)
    if len(train_loader) == 0:
        raise ValueError(f"{len(train)} training images give no batch of {cfg.data.batch_size}")
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


# ---- checkpoints ---------------------------------------------------------------------------------
def save_checkpoint(ckpt_root: Path, epoch: int, step: int, model, optimizer, ema, best: float) -> Path:
    """Main process only. Weights as safetensors, optimizer state as plain tensors, progress as JSON."""
    tag = ckpt_root / f"epoch_{epoch:04d}"
    tag.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tag / "model.safetensors"))
    if ema is not None:
        save_file({k: v.detach().contiguous() for k, v in ema.module.state_dict().items()},
                  str(tag / "ema.safetensors"))
    torch.save(optimizer.state_dict(), tag / "optimizer.pt")
    (tag / "state.json").write_text(json.dumps({"epoch": epoch, "step": step, "best_top1": best}))
    tmp = ckpt_root / "latest.tmp"
    tmp.write_text(tag.name)
    os.replace(tmp, ckpt_root / "latest")  # only a complete checkpoint is ever named
    return tag


def find_resume(cfg: FinetuneConfig, ckpt_root: Path) -> Optional[Path]:
    if cfg.run.resume == "none":
        return None
    if cfg.run.resume == "auto":
        pointer = ckpt_root / "latest"
        return ckpt_root / pointer.read_text().strip() if pointer.is_file() else None
    path = Path(cfg.run.resume)
    if not (path / "state.json").is_file():
        raise ResumeError(f"run.resume={path}: not a fine-tuning checkpoint (no state.json)")
    return path


def load_optimizer_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ResumeError(f"{path}: refused to unpickle (only tensors and plain containers are allowed): "
                          f"{str(err).splitlines()[0]}") from err


def load_checkpoint(tag: Path, model, optimizer, ema) -> dict:
    model.load_state_dict(load_file(str(tag / "model.safetensors")))
    optimizer.load_state_dict(load_optimizer_state(tag / "optimizer.pt"))
    if ema is not None and (tag / "ema.safetensors").is_file():
        ema.module.load_state_dict(load_file(str(tag / "ema.safetensors")))
    return json.loads((tag / "state.json").read_text())


# ---- the loop ------------------------------------------------------------------------------------
def make_accelerator(cfg: FinetuneConfig) -> Accelerator:
    on_gpu = torch.cuda.is_available() and not cfg.cpu
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if on_gpu else "fp32")
    if precision == "bf16" and not on_gpu:
        precision = "fp32"  # fp32 on CPU
    loader_cfg = DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True, data_seed=cfg.run.seed)
    return Accelerator(cpu=not on_gpu, mixed_precision="bf16" if precision == "bf16" else "no",
                       dataloader_config=loader_cfg)


def train(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune (or probe); returns the final metrics, also written to RUN/results.json."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    accelerator = make_accelerator(cfg)
    set_seed(cfg.run.seed)  # same init and same shuffles on every process and every process count
    run_dir = make_run_dir(cfg.run.root, cfg.run.name)
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
    model, report, meta = build_classifier(cfg)
    if report is not None and accelerator.is_main_process:
        print(report)
    encoder = model.encoder if hasattr(model, "encoder") else model
    img_size = encoder.cfg.img_size
    if meta is not None and cfg.data.mean == FinetuneConfig().data.mean and meta.get("pixel_norm", {}).get("mean"):
        cfg.data.mean, cfg.data.std = meta["pixel_norm"]["mean"], meta["pixel_norm"]["std"]  # the export's
    train_loader, val_loader = build_loaders(cfg, img_size, accelerator.num_processes)

    layer_decay = cfg.optim.layer_decay if cfg.mode == "finetune" else None
    groups = param_groups(model, cfg.optim.weight_decay, layer_decay, num_layers=encoder.cfg.depth)
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.optim.betas))
    ema = ModelEmaV3(model, decay=cfg.ema) if cfg.ema > 0 else None
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    mixup, criterion = build_criterion(cfg)

    steps_per_epoch = len(train_loader)
    total_steps = cfg.optim.epochs * steps_per_epoch
    if cfg.optim.max_steps > 0:
        total_steps = min(total_steps, cfg.optim.max_steps)
    warmup = int(cfg.optim.warmup_epochs * steps_per_epoch)
    peak_lr = resolve_lr(cfg.optim.lr, cfg.data.batch_size, cfg.optim.base_batch_size)

    ckpt_root = run_dir / "checkpoints"
    start_epoch, step, best = 0, 0, 0.0
    tag = find_resume(cfg, ckpt_root)
    if tag is not None:
        state = load_checkpoint(tag, accelerator.unwrap_model(model), optimizer, ema)
        start_epoch, step, best = state["epoch"] + 1, state["step"], state["best_top1"]
        accelerator.print(f"resumed from {tag} (epoch {state['epoch']}, step {step})")

    logger = MetricsLogger(run_dir, enabled=accelerator.is_main_process, tensorboard=False)
    metrics: dict[str, Any] = {}
    epoch = start_epoch
    bar = progress(total_steps, desc=f"{cfg.mode} {cfg.run.name}", enabled=accelerator.is_main_process,
                   initial=step)
    for epoch in range(start_epoch, cfg.optim.epochs):
        if step >= total_steps:
            break
        train_loader.set_epoch(epoch)
        model.train()
        for images, targets in train_loader:
            if step >= total_steps:
                break
            lr = cosine_schedule(step, peak_lr, warmup, total_steps, cfg.optim.min_lr)
            apply_schedule(optimizer, lr, cfg.optim.weight_decay)
            if mixup is not None:
                images, targets = mixup(images, targets)
            with accelerator.autocast():
                loss = criterion(model(images).float(), targets)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if cfg.optim.clip_grad:
                accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            optimizer.step()
            if ema is not None:
                ema.update(accelerator.unwrap_model(model), step=step)
            step += 1
            bar.update(1)
            if step % cfg.run.log_every == 0:
                logger.log(step, loss=float(loss.detach()), lr=lr, epoch=epoch, samples=step * cfg.data.batch_size)
        last = epoch + 1 == cfg.optim.epochs or step >= total_steps
        if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            metrics = evaluate(model, val_loader, accelerator)
            if ema is not None:
                metrics.update({f"ema_{k}": v for k, v in evaluate(ema.module, val_loader, accelerator).items()})
            best = max(best, metrics["top1"])
            logger.log(step, epoch=epoch, **{f"val_{k}": v for k, v in metrics.items()})
            accelerator.print(f"epoch {epoch}: top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f} "
                              f"({metrics['count']} images)")
        if accelerator.is_main_process and (last or (cfg.run.save_every and (epoch + 1) % cfg.run.save_every == 0)):
            save_checkpoint(ckpt_root, epoch, step, accelerator.unwrap_model(model), optimizer, ema, best)
        accelerator.wait_for_everyone()
    bar.close()
    if not metrics:  # resumed after the end: evaluate what was loaded
        metrics = evaluate(model, val_loader, accelerator)
    result = dict(metrics, best_top1=max(best, metrics["top1"]), steps=step, epochs=epoch + 1,
                  num_processes=accelerator.num_processes, mode=cfg.mode, init=cfg.model.init or "scratch",
                  train_images=len(train_loader.dataset))
    if accelerator.is_main_process:
        (run_dir / "results.json").write_text(json.dumps(result, indent=2))
    logger.close()
    accelerator.wait_for_everyone()
    return result


def main(argv: Optional[list[str]] = None) -> int:
    cfg = parse_cli(FinetuneConfig, argv, prog="finetune", description="fine-tune or linearly probe a ViT")
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}))
    return 0
