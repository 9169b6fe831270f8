"""The classification loop on accelerate: `accelerate launch finetune --config ...`, `python finetune ...`,
or `torchrun --nproc_per_node N finetune ...`.

Batches are global and split across processes (``split_batches``), so a run on N processes steps through
the same batches as on one. lr and weight decay follow a per-step warmup + cosine with each group's
``lr_scale`` (layer-wise decay). Checkpoints are safetensors (weights) + a tensors-only optimizer file read
back with ``weights_only=True`` + JSON + each process's RNG state, under ``RUN/checkpoints/epoch_XXXX`` with
an atomic ``latest``.

Preemption (Slurm's ``--signal=USR1@120``, submitit's USR2, SIGTERM): a signal only sets a
:class:`~mimkit.distributed.preempt.PreemptionFlag`; every process asks the flag at every step boundary (a
collective, so all of them stop after the same step), then all save a mid-epoch checkpoint
``epoch_XXXX_step_YYYYYYYY`` (the epoch, the batches of it already trained, the RNG states), the main process
writes ``RUN/requeue``, and :func:`train` raises :class:`Preempted`, which :func:`main` turns into exit code
``REQUEUE_EXIT_CODE`` (75). The resumed run re-enters that epoch with the same shuffle (seedable sampler, seed
+ epoch) and skips the batches already trained at the sampler level (nothing is loaded for them). With
``aug.enabled=false`` (or ``num_workers=0`` and resumes at epoch ends) it repeats the uninterrupted run
exactly in fp32; with augmentation, a mid-epoch resume trains the same batches in the same order, but their
random augmentations differ (the loader draws them ahead of the step, and workers reseed per iterator).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

from mimkit.config import parse_cli, save_config
from mimkit.distributed.preempt import REQUEUE_EXIT_CODE, PreemptionFlag
from mimkit.finetune.class_data import build_dataset, build_transform, dataset_targets, label_subset
from mimkit.finetune.classification import build_classifier
from mimkit.finetune.config import MODES, FinetuneConfig
from mimkit.finetune.metrics import evaluate
from mimkit.optim import apply_schedule, cosine_schedule, param_groups, resolve_lr
from mimkit.runlog import MetricsLogger, make_run_dir, progress


# Written by the main process into the run folder once every process has saved after a preemption signal;
# slurm/finetune.sh requeues on it (accelerate's launcher turns a process's exit code 75 into its own 1).
REQUEUE_MARKER = "requeue"


class ResumeError(RuntimeError):
    """A fine-tuning checkpoint that cannot be resumed from (missing, or holding more than tensors)."""


class Preempted(SystemExit):
    """Raised by :func:`train` on every process after the preemption save. A ``SystemExit`` with code
    ``REQUEUE_EXIT_CODE``: a caller that does not catch it (``compare_init``) exits 75 too."""

    def __init__(self, tag: Path, step: int, epoch: int, epoch_step: int):
        super().__init__(REQUEUE_EXIT_CODE)
        self.tag, self.step, self.epoch, self.epoch_step = tag, step, epoch, epoch_step


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
def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch, CUDA) as tensors and plain containers only, so that
    they load with ``weights_only=True``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                    int(has_gauss), float(gauss)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(accelerator: Accelerator, ckpt_root: Path, epoch: int, step: int, model, optimizer, ema,
                    best: float, epoch_step: Optional[int] = None, steps_per_epoch: Optional[int] = None) -> Path:
    """Collective: every process calls it. Each process writes its RNG state; the main process the weights
    (safetensors), the optimizer state (plain tensors), the EMA and the progress (JSON). ``latest`` names the
    checkpoint only once every process has written. ``epoch_step`` (batches of ``epoch`` already trained)
    makes it a mid-epoch checkpoint: a resume re-enters ``epoch`` and skips those batches."""
    mid = epoch_step is not None
    tag = ckpt_root / (f"epoch_{epoch:04d}_step_{step:08d}" if mid else f"epoch_{epoch:04d}")
    tag.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), tag / f"rng_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(model)
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tag / "model.safetensors"))
        if ema is not None:
            save_file({k: v.detach().contiguous() for k, v in ema.module.state_dict().items()},
                      str(tag / "ema.safetensors"))
        torch.save(optimizer.state_dict(), tag / "optimizer.pt")
        state = {"epoch": epoch, "step": step, "best_top1": best, "num_processes": accelerator.num_processes}
        if mid:
            state.update(epoch_step=epoch_step, steps_per_epoch=steps_per_epoch)
        (tag / "state.json").write_text(json.dumps(state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = ckpt_root / "latest.tmp"
        tmp.write_text(tag.name)
        os.replace(tmp, ckpt_root / "latest")  # only a complete checkpoint is ever named
        for old in ckpt_root.glob("epoch_*_step_*"):  # mid-epoch saves are superseded by any later save
            if old.is_dir() and old != tag:
                shutil.rmtree(old, ignore_errors=True)
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


def load_checkpoint(tag: Path, model, optimizer, ema, process_index: int = 0) -> dict:
    """Loads weights, optimizer and EMA; returns the progress (state.json) with ``rng``: this process's RNG
    state, or None (a checkpoint from before RNG states were saved, or from fewer processes)."""
    model.load_state_dict(load_file(str(tag / "model.safetensors")))
    optimizer.load_state_dict(load_optimizer_state(tag / "optimizer.pt"))
    if ema is not None and (tag / "ema.safetensors").is_file():
        ema.module.load_state_dict(load_file(str(tag / "ema.safetensors")))
    state = json.loads((tag / "state.json").read_text())
    rng_file = tag / f"rng_{process_index}.pt"
    state["rng"] = load_optimizer_state(rng_file) if rng_file.is_file() else None
    return state


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
    """Fine-tune (or probe); returns the final metrics, also written to RUN/results.json. After a preemption
    signal: saves a mid-epoch checkpoint on every process and raises :class:`Preempted` (exit code 75)."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    # First thing: a warning signal during setup (model load, data index) must not kill the process either;
    # it is acted on at the first step boundary.
    flag = PreemptionFlag().install()
    preempted = False
    try:
        return _train(cfg, flag)
    except Preempted:
        # Keep the handlers until the process exits: the launcher (torchrun / accelerate) SIGTERMs the
        # processes still running once the first one has exited 75; with the default action back, a peer
        # still shutting down would die with 143 instead of 75.
        preempted = True
        raise
    finally:
        if not preempted:
            flag.uninstall()


def _train(cfg: FinetuneConfig, flag: PreemptionFlag) -> dict[str, Any]:
    accelerator = make_accelerator(cfg)
    set_seed(cfg.run.seed)  # same init and same shuffles on every process and every process count
    run_dir = make_run_dir(cfg.run.root, cfg.run.name)
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / REQUEUE_MARKER).unlink(missing_ok=True)  # a stale one from the run this one resumes
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
    skip = 0  # batches of start_epoch already trained (a mid-epoch checkpoint)
    rng = None  # this process's RNG state at the checkpoint, put back where the uninterrupted run was
    tag = find_resume(cfg, ckpt_root)
    if tag is not None:
        state = load_checkpoint(tag, accelerator.unwrap_model(model), optimizer, ema, accelerator.process_index)
        step, best, rng = state["step"], state["best_top1"], state["rng"]
        if "epoch_step" in state:  # saved mid-epoch after a preemption signal: finish that epoch first
            start_epoch, skip = state["epoch"], state["epoch_step"]
            if state.get("steps_per_epoch") not in (None, steps_per_epoch):
                raise ResumeError(f"{tag}: saved with {state['steps_per_epoch']} batches per epoch, this run has "
                                  f"{steps_per_epoch} (data or data.batch_size changed): cannot resume mid-epoch")
        else:
            start_epoch = state["epoch"] + 1
        accelerator.print(f"resumed from {tag} (epoch {state['epoch']}, step {step}"
                          + (f", batch {skip} of {steps_per_epoch} in the epoch)" if skip else ")"))

    logger = MetricsLogger(run_dir, enabled=accelerator.is_main_process, tensorboard=False)
    metrics: dict[str, Any] = {}
    epoch = start_epoch
    bar = progress(total_steps, desc=f"{cfg.mode} {cfg.run.name}", enabled=accelerator.is_main_process,
                   initial=step)
    try:
        for epoch in range(start_epoch, cfg.optim.epochs):
            mid_epoch = epoch == start_epoch and skip > 0
            if step >= total_steps and not mid_epoch:  # (a save after the last step still owes its epoch end)
                break
            train_loader.set_epoch(epoch)  # the epoch's shuffle: seed + epoch, the same after a resume
            loader = accelerator.skip_first_batches(train_loader, skip) if mid_epoch else train_loader
            epoch_step = skip if mid_epoch else 0
            if rng is not None and not mid_epoch:  # epoch start: where the uninterrupted run saved it
                set_rng_state(rng)
                rng = None
            model.train()
            for images, targets in loader:
                if rng is not None:
                    # Mid-epoch: after the loader has started (its start may draw from the RNG), before the
                    # step: the uninterrupted run was at the saved state here (loading without augmentation
                    # draws nothing).
                    set_rng_state(rng)
                    rng = None
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
                epoch_step += 1
                bar.update(1)
                if step % cfg.run.log_every == 0:
                    logger.log(step, loss=float(loss.detach()), lr=lr, epoch=epoch,
                               samples=step * cfg.data.batch_size)
                if step == cfg.debug.signal_at_step and accelerator.process_index == cfg.debug.signal_rank:
                    os.kill(os.getpid(), signal.SIGUSR1)  # what Slurm's --signal=USR1@120 does (tests)
                if flag.should_stop():  # collective: every process, every step; any signalled -> all stop here
                    _preempt(accelerator, run_dir, ckpt_root, logger, epoch, step, epoch_step, steps_per_epoch,
                             model, optimizer, ema, best, flag)
            if rng is not None:  # resumed after the epoch's last batch: nothing was left to train
                set_rng_state(rng)
                rng = None
            last = epoch + 1 == cfg.optim.epochs or step >= total_steps
            if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
                metrics = evaluate(model, val_loader, accelerator)
                if ema is not None:
                    metrics.update({f"ema_{k}": v for k, v in evaluate(ema.module, val_loader, accelerator).items()})
                best = max(best, metrics["top1"])
                logger.log(step, epoch=epoch, **{f"val_{k}": v for k, v in metrics.items()})
                accelerator.print(f"epoch {epoch}: top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f} "
                                  f"({metrics['count']} images)")
            if last or (cfg.run.save_every and (epoch + 1) % cfg.run.save_every == 0):
                save_checkpoint(accelerator, ckpt_root, epoch, step, model, optimizer, ema, best)
            accelerator.wait_for_everyone()
        if not metrics:  # resumed after the end: evaluate what was loaded
            metrics = evaluate(model, val_loader, accelerator)
        result = dict(metrics, best_top1=max(best, metrics["top1"]), steps=step, epochs=epoch + 1,
                      num_processes=accelerator.num_processes, mode=cfg.mode, init=cfg.model.init or "scratch",
                      train_images=len(train_loader.dataset))
        if accelerator.is_main_process:
            (run_dir / "results.json").write_text(json.dumps(result, indent=2))
    finally:
        bar.close()
        logger.close()
    accelerator.wait_for_everyone()
    return result


def _preempt(accelerator: Accelerator, run_dir: Path, ckpt_root: Path, logger: MetricsLogger, epoch: int,
             step: int, epoch_step: int, steps_per_epoch: int, model, optimizer, ema, best: float,
             flag: PreemptionFlag) -> None:
    """Every process, after the same step: save mid-epoch, mark the run for requeue, raise Preempted."""
    tag = save_checkpoint(accelerator, ckpt_root, epoch, step, model, optimizer, ema, best, epoch_step=epoch_step,
                          steps_per_epoch=steps_per_epoch)
    logger.log(step, epoch=epoch, epoch_step=epoch_step, event="preempted")
    if accelerator.is_main_process:  # after save_checkpoint's barrier: every process has saved, latest names it
        tmp = run_dir / (REQUEUE_MARKER + ".tmp")
        tmp.write_text(json.dumps({"checkpoint": tag.name, "step": step, "epoch": epoch, "epoch_step": epoch_step,
                                   "signal": flag.signal_name}))
        os.replace(tmp, run_dir / REQUEUE_MARKER)
    accelerator.wait_for_everyone()  # no process exits before the marker is there (a launcher kills the rest)
    print(f"[finetune] process {accelerator.process_index}: stopped at step {step} (epoch {epoch}, batch "
          f"{epoch_step} of {steps_per_epoch}; {flag.signal_name if flag.requested else 'another process'} "
          f"signalled), saved {tag.name}; exit {REQUEUE_EXIT_CODE} to requeue", flush=True)
    raise Preempted(tag, step, epoch, epoch_step)


def main(argv: Optional[list[str]] = None) -> int:
    cfg = parse_cli(FinetuneConfig, argv, prog="finetune", description="fine-tune or linearly probe a ViT")
    try:
        result = train(cfg)
    except Preempted as stop:
        return stop.code  # REQUEUE_EXIT_CODE
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}))
    return 0
