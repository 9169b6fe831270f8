"""The fine-tuning loop of every task on accelerate: `accelerate launch finetune --config ...`, `python
finetune ...`, or `torchrun --nproc_per_node N finetune ...`.

The task (`task:`, the table in `tasks.py`; the contract in `task.py`) brings the network, the loaders,
the per-batch loss, the evaluation and its result files; this file knows no task by name. The setup
(accelerator, optimizer with layer-wise decay, resume) lives here; the loop is the shared skeleton, :func:`mimkit.distributed.loop.train_loop`, running :class:`FinetuneStep`. Epochs map onto
its steps: :class:`EpochBatches` feeds the batches of one epoch after another, and after-step hooks update
the EMA and, at each epoch end (and the last step), evaluate (``eval_every``) and save (``run.save_every``).

Batches are global and split across processes (``split_batches``), so a run on N processes steps through
the same batches as on one. lr and weight decay follow a per-step warmup + cosine with each group's
``lr_scale`` (layer-wise decay), or poly decay (``optim.schedule=poly``, segmentation). The logged ``loss`` is the mean over processes and the steps of the log
window. Checkpoints are safetensors (weights) + a tensors-only optimizer file read back with
``weights_only=True`` + JSON + each process's RNG state, under ``RUN/checkpoints/epoch_XXXX`` with an atomic
``latest`` (:func:`mimkit.checkpoint.store.publish_latest`).

Preemption (Slurm's ``--signal=USR1@120``, submitit's USR2, SIGTERM): a signal only sets a
:class:`~mimkit.distributed.preempt.PreemptionFlag`, which the skeleton asks at every step boundary (a
collective, so all processes stop after the same step); all then save a mid-epoch checkpoint
``epoch_XXXX_step_YYYYYYYY`` (the epoch, the batches of it already trained, the RNG states), the main process
writes ``RUN/requeue``, and :func:`train` raises the skeleton's :class:`~mimkit.distributed.loop.Preempted`
(a ``SystemExit`` 75), which :func:`main` returns as exit code ``REQUEUE_EXIT_CODE``. The resumed run
re-enters that epoch with the same shuffle (seedable sampler, seed + epoch) and skips the batches already
trained at the sampler level (nothing is loaded for them). With ``aug.enabled=false`` (or ``num_workers=0``
and resumes at epoch ends) it repeats the uninterrupted run exactly in fp32; with augmentation, a mid-epoch
resume trains the same batches in the same order, but their random augmentations differ (the loader draws
them ahead of the step, and workers reseed per iterator).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from timm.utils import ModelEmaV3

from mimkit.checkpoint.export_format import write_atomic
from mimkit.checkpoint.store import CheckpointError, choose_checkpoint, publish_latest, rng_state, set_rng_state
from mimkit.config import parse_cli, save_config
from mimkit.distributed.loop import LoopConfig, Preempted, train_loop
from mimkit.distributed.preempt import REQUEUE_EXIT_CODE, PreemptionFlag
from mimkit.errors import BadValue, run_main
from mimkit.finetune.config import PRECISIONS, SCHEDULES, FinetuneConfig
from mimkit.finetune.task import Task
from mimkit.finetune.tasks import resolve_task, task_for
from mimkit.optim import apply_schedule, cosine_schedule, param_groups, poly_schedule, resolve_lr, step_schedule
from mimkit.runlog import MetricsLogger, make_run_dir, progress, progress_mode


# Written by the main process into the run folder once every process has saved after a preemption signal;
# slurm/finetune.sh requeues on it (accelerate's launcher turns a process's exit code 75 into its own 1).
REQUEUE_MARKER = "requeue"
STATE = "state.json"  # written last by a fine-tuning save: what makes a folder a checkpoint


class ResumeError(CheckpointError):
    """A fine-tuning checkpoint that cannot be resumed from (missing, or holding more than tensors)."""


def check_config(cfg: FinetuneConfig) -> Task:
    """Settings the loop would trip over, refused before any work; the run's task (which checks its own)."""
    resolve_task(cfg)
    for key, value, least in (("run.log_every", cfg.run.log_every, 1), ("run.save_every", cfg.run.save_every, 0),
                              ("eval_every", cfg.eval_every, 0), ("optim.epochs", cfg.optim.epochs, 1)):
        if value < least:
            raise BadValue(f"{key}={value}: expected >= {least}")
    if cfg.optim.schedule not in SCHEDULES:
        raise BadValue(f"optim.schedule={cfg.optim.schedule!r}: expected one of {SCHEDULES}")
    if cfg.precision not in PRECISIONS:
        raise BadValue(f"precision={cfg.precision!r}: expected one of {list(PRECISIONS)}")
    if cfg.precision == "fp16" and not runs_on_gpu(cfg):
        raise BadValue("precision=fp16 needs a GPU (its loss scaler is CUDA's): use fp32 or bf16 on CPU")
    return task_for(cfg.task).build(cfg)


# ---- checkpoints ---------------------------------------------------------------------------------
def save_checkpoint(accelerator: Accelerator, ckpt_root: Path, epoch: int, step: int, model, optimizer, ema,
                    best: dict[str, float], epoch_step: Optional[int] = None, steps_per_epoch: Optional[int] = None) -> Path:
    """Collective: every process calls it. Each process writes its RNG state; the main process the weights
    (safetensors), the optimizer state (plain tensors), the EMA and the progress (JSON). ``latest`` names the
    checkpoint only once every process has written. ``epoch_step`` (batches of ``epoch`` already trained)
    makes it a mid-epoch checkpoint: a resume re-enters ``epoch`` and skips those batches."""
    mid = epoch_step is not None
    tag = ckpt_root / (f"epoch_{epoch:04d}_step_{step:08d}" if mid else f"epoch_{epoch:04d}")
    tag.mkdir(parents=True, exist_ok=True)
    written = [tag / f"rng_{accelerator.process_index}.pt"]
    torch.save(rng_state(), written[0])
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(model)
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tag / "model.safetensors"))
        if ema is not None:
            save_file({k: v.detach().contiguous() for k, v in ema.module.state_dict().items()},
                      str(tag / "ema.safetensors"))
        torch.save(optimizer.state_dict(), tag / "optimizer.pt")
        state = {"epoch": epoch, "step": step, "best": best, "num_processes": accelerator.num_processes}
        if mid:
            state.update(epoch_step=epoch_step, steps_per_epoch=steps_per_epoch)
        (tag / STATE).write_text(json.dumps(state))
        written += [tag / name for name in ("model.safetensors", "ema.safetensors", "optimizer.pt", STATE)
                    if ema is not None or name != "ema.safetensors"]
    # complete.json beside state.json: the size and SHA-256 of every file, which resume verifies
    publish_latest(ckpt_root, tag.name, {"step": step}, prune=lambda newest: _drop_mid_epoch_saves(ckpt_root, newest),
                   written=written)
    return tag


def _drop_mid_epoch_saves(ckpt_root: Path, newest: str) -> None:
    """Mid-epoch saves are superseded by any later save (and `latest` already names that one)."""
    for old in ckpt_root.glob("epoch_*_step_*"):
        if old.is_dir() and old.name != newest:
            shutil.rmtree(old, ignore_errors=True)


def find_resume(cfg: FinetuneConfig, ckpt_root: Path) -> Optional[Path]:
    """Collective: the checkpoint to resume, verified against its complete.json (fallback as in
    :func:`mimkit.checkpoint.store.choose_checkpoint`)."""
    try:
        return choose_checkpoint(cfg.run.resume, ckpt_root, required=STATE)
    except CheckpointError as err:
        raise ResumeError(f"run.resume={cfg.run.resume}: {err}") from err


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
    state = json.loads((tag / STATE).read_text())
    rng_file = tag / f"rng_{process_index}.pt"
    state["rng"] = load_optimizer_state(rng_file) if rng_file.is_file() else None
    return state


@dataclass
class Progress:
    """Where a run stands: steps done, the epoch and the batches of it trained, the best top-1 so far, and
    the RNG state to put back (a resume) where the uninterrupted run had it."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    best: dict[str, float] = field(default_factory=dict)  # {primary metric: best value so far}
    rng: Optional[dict] = None


def resume_progress(tag: Optional[Path], accelerator: Accelerator, model, optimizer, ema,
                    steps_per_epoch: int) -> Progress:
    """Loads checkpoint `tag` (:func:`find_resume`'s) into the prepared model, optimizer and EMA; a fresh
    Progress when there is none."""
    if tag is None:
        return Progress()
    state = load_checkpoint(tag, accelerator.unwrap_model(model), optimizer, ema, accelerator.process_index)
    # an epoch-end save counts its epoch as fully trained; a mid-epoch one (preemption) the batches it had done
    epoch_step = state.get("epoch_step", steps_per_epoch)
    if "epoch_step" in state and state.get("steps_per_epoch") not in (None, steps_per_epoch):
        raise ResumeError(f"{tag}: saved with {state['steps_per_epoch']} batches per epoch, this run has "
                          f"{steps_per_epoch} (data or data.batch_size changed): cannot resume mid-epoch")
    mid = epoch_step < steps_per_epoch
    accelerator.print(f"resumed from {tag} (epoch {state['epoch']}, step {state['step']}"
                      + (f", batch {epoch_step} of {steps_per_epoch} in the epoch)" if mid else ")"))
    best = state["best"] if "best" in state else {"top1": state["best_top1"]}  # before the task contract: top-1
    return Progress(state["step"], state["epoch"], epoch_step, best, state["rng"])


# ---- the loop ------------------------------------------------------------------------------------
class EpochBatches:
    """The training batches of one epoch after another, as the step loop draws them, and the position of the
    last one drawn (``epoch``, ``epoch_step``: batches of that epoch drawn so far), which a save records.

    Starting from a Progress: a mid-epoch position re-enters that epoch (the same shuffle: seed + epoch) and
    skips the batches already trained; its RNG state goes back where the uninterrupted run had it."""

    def __init__(self, loader, accelerator: Accelerator, start: Progress):
        self.loader, self.accelerator = loader, accelerator
        self.steps_per_epoch = len(loader)
        self.epoch, self.epoch_step = start.epoch, start.epoch_step
        self._rng = start.rng
        self._skips_seen = 0

    @property
    def at_epoch_end(self) -> bool:
        return self.epoch_step >= self.steps_per_epoch

    def __iter__(self) -> Iterator:
        while True:
            if self.at_epoch_end:
                self.epoch, self.epoch_step = self.epoch + 1, 0
            yield from self._rest_of_epoch()

    def _rest_of_epoch(self) -> Iterator:
        self.loader.set_epoch(self.epoch)  # the epoch's shuffle: seed + epoch, the same after a resume
        if hasattr(self.loader.dataset, "set_epoch"):  # seeded augmentation (accelerate skips it under a sampler)
            self.loader.dataset.set_epoch(self.epoch)
        skip = self.epoch_step
        if not skip:
            self._put_back_rng()  # epoch start: where the uninterrupted run saved it
        for batch in self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader:
            # Mid-epoch: after the loader has started (its start may draw from the RNG), before the step:
            # the uninterrupted run was at the saved state here (loading without augmentation draws nothing).
            self._put_back_rng()
            self.epoch_step += 1
            yield batch

    def new_skips(self) -> int:
        """Samples the train set could not decode (and replaced) since the last call: a dataset may count
        them with `skipped_samples()` (the shard reader's datasets do); summed over processes per window."""
        dataset = self.loader.dataset
        while isinstance(dataset, torch.utils.data.Subset):
            dataset = dataset.dataset
        total = dataset.skipped_samples() if hasattr(dataset, "skipped_samples") else 0
        new, self._skips_seen = total - self._skips_seen, total
        return new

    def _put_back_rng(self) -> None:
        if self._rng is not None:
            set_rng_state(self._rng)
            self._rng = None


class FinetuneStep:
    """The StepBody of fine-tuning, plus its after-step hooks (EMA, epoch end) and the run's best value of
    the task's primary metric."""

    def __init__(self, cfg: FinetuneConfig, task: Task, accelerator: Accelerator, model, optimizer, ema, loaders,
                 ckpt_root: Path, logger: MetricsLogger, start: Progress):
        self.cfg, self.accelerator, self.model, self.optimizer, self.ema = cfg, accelerator, model, optimizer, ema
        self.task = task
        train_loader, self.val_loader = loaders
        self.batches = EpochBatches(train_loader, accelerator, start)
        steps_per_epoch = self.batches.steps_per_epoch
        self.total_steps = cfg.optim.epochs * steps_per_epoch
        if cfg.optim.max_steps > 0:
            self.total_steps = min(self.total_steps, cfg.optim.max_steps)
        self.warmup = cfg.optim.warmup_steps or int(cfg.optim.warmup_epochs * steps_per_epoch)
        self.peak_lr = resolve_lr(cfg.optim.lr, cfg.data.batch_size, cfg.optim.base_batch_size)
        self.ckpt_root, self.logger, self.start_step = ckpt_root, logger, start.step
        self.best = start.best.get(task.primary, float("-inf"))
        self.lr, self.metrics, self.saved_step, self.saved_tag = 0.0, {}, -1, None

    def begin_step(self, step: int) -> None:
        optim = self.cfg.optim
        schedule, extra = {"cosine": (cosine_schedule, {}), "poly": (poly_schedule, {"power": optim.poly_power}),
                           "step": (step_schedule, {"milestones": optim.milestones, "gamma": optim.gamma})}[optim.schedule]
        self.lr = schedule(step, self.peak_lr, self.warmup, self.total_steps, optim.min_lr, **extra)
        apply_schedule(self.optimizer, self.lr, self.cfg.optim.weight_decay)

    def micro_step(self, step: int, batch) -> dict[str, Any]:
        with self.accelerator.autocast():
            out = self.task.loss(self.model, batch)
        loss = self.cfg.debug.poison(out["loss"], step, self.accelerator.process_index)
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        if self.cfg.optim.clip_grad:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.optimizer.step()
        metrics = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in out.items()} | {"loss": loss.detach()}
        return metrics | {"skipped_samples": self.batches.new_skips()}

    def save(self, step: int) -> None:
        """An epoch-end checkpoint at an epoch's end or the last step, else a mid-epoch one (preemption).
        Once per step: a preemption right after the epoch-end save finds it done."""
        if step == self.saved_step:
            return
        batches = self.batches
        whole = batches.at_epoch_end or step >= self.total_steps
        self.saved_tag = save_checkpoint(self.accelerator, self.ckpt_root, batches.epoch, step, self.model,
                                         self.optimizer, self.ema, {self.task.primary: self.best},
                                         epoch_step=None if whole else batches.epoch_step,
                                         steps_per_epoch=None if whole else batches.steps_per_epoch)
        self.saved_step = step

    def update_ema(self, step: int) -> None:
        self.ema.update(self.accelerator.unwrap_model(self.model), step=step - 1)  # step - 1: the one just taken

    def end_epoch(self, step: int) -> None:
        """After-step hook: at an epoch's end (or the last step), evaluate and save when due."""
        last = step >= self.total_steps
        if not (self.batches.at_epoch_end or last):
            return
        done = self.batches.epoch + 1  # epochs trained, this one included
        if last or (self.cfg.eval_every and done % self.cfg.eval_every == 0):
            self.validate(step)
        if last or (self.cfg.run.save_every and done % self.cfg.run.save_every == 0):
            self.save(step)

    def validate(self, step: int) -> dict[str, Any]:
        metrics = self.task.evaluate(self.model, self.val_loader, self.accelerator)
        if self.ema is not None:
            ema_metrics = self.task.evaluate(self.ema.module, self.val_loader, self.accelerator)
            metrics.update({f"ema_{k}": v for k, v in ema_metrics.items()})
        self.model.train()  # evaluate left it in eval mode; the next step trains
        self.best, self.metrics = max(self.best, metrics[self.task.primary]), metrics
        self.logger.log(step, epoch=self.batches.epoch, **{f"val_{k}": v for k, v in metrics.items()
                                                           if isinstance(v, (int, float))})
        if progress_mode() != "off":  # the caller runs it quietly (compare_init): metrics.jsonl has it
            self.accelerator.print(f"epoch {self.batches.epoch}: {self.task.describe(metrics)}")
        return metrics


def runs_on_gpu(cfg: FinetuneConfig) -> bool:
    return torch.cuda.is_available() and not cfg.cpu


def mixed_precision(cfg: FinetuneConfig) -> str:
    """accelerate's `mixed_precision`: auto is bf16 where a GPU is and fp32 (no) on CPU, where bf16 matmuls
    are far slower; fp16 brings accelerate's dynamic loss scaler."""
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if runs_on_gpu(cfg) else "fp32")
    return "no" if precision == "fp32" else precision


def make_accelerator(cfg: FinetuneConfig) -> Accelerator:
    on_gpu = runs_on_gpu(cfg)
    loader_cfg = DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True, data_seed=cfg.run.seed,
                                         non_blocking=on_gpu)  # from pinned batches (task.loader_options)
    return Accelerator(cpu=not on_gpu, mixed_precision=mixed_precision(cfg),
                       dataloader_config=loader_cfg)


def build_step(cfg: FinetuneConfig, task: Task, accelerator: Accelerator, run_dir: Path,
               resume_from: Optional[Path], logger: MetricsLogger) -> FinetuneStep:
    """The task's network and loaders, optimizer and EMA on the accelerator, checkpoint `resume_from` loaded."""
    built = task.build_model()
    model, encoder, report, meta = built.model, built.encoder, built.report, built.meta
    if report is not None and accelerator.is_main_process:  # one line here, every key in the run folder
        (run_dir / "load_report.txt").write_text(f"model.init={cfg.model.init}\n{report}\n")
        print(f"model.init={cfg.model.init}: {report.summary()} (details: {run_dir / 'load_report.txt'})", flush=True)
    if meta is not None and cfg.data.mean == FinetuneConfig().data.mean and meta.get("pixel_norm", {}).get("mean"):
        cfg.data.mean, cfg.data.std = meta["pixel_norm"]["mean"], meta["pixel_norm"]["std"]  # the export's
    train_loader, val_loader = task.build_loaders(encoder.cfg.img_size, accelerator)
    layer_decay = cfg.optim.layer_decay if cfg.mode == "finetune" else None
    groups = param_groups(model, cfg.optim.weight_decay, layer_decay, num_layers=encoder.cfg.depth)
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.optim.betas))
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    # Built from the prepared model, so it lives on the accelerator's device (timm also puts its
    # stochastic-rounding generator on the device of the copy it makes here).
    ema = ModelEmaV3(accelerator.unwrap_model(model), decay=cfg.ema) if cfg.ema > 0 else None
    if cfg.compile:  # after the EMA copy, which stays eager; in place, so state-dict keys keep their names
        accelerator.unwrap_model(model).compile(backend=cfg.compile_backend)
    ckpt_root = run_dir / "checkpoints"
    start = resume_progress(resume_from, accelerator, model, optimizer, ema, len(train_loader))
    model.train()
    return FinetuneStep(cfg, task, accelerator, model, optimizer, ema, (train_loader, val_loader), ckpt_root, logger, start)


def train(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune (or probe); returns the final metrics, also written to RUN/results.json. After a preemption
    signal: saves a mid-epoch checkpoint on every process and raises :class:`Preempted` (exit code 75)."""
    task = check_config(cfg)
    # First thing: a warning signal during setup (model load, data index) must not kill the process either;
    # it is acted on at the first step boundary.
    flag = PreemptionFlag().install()
    preempted = False
    try:
        return _train(cfg, task, flag)
    except Preempted:
        # Keep the handlers until the process exits: the launcher (torchrun / accelerate) SIGTERMs the
        # processes still running once the first one has exited 75; with the default action back, a peer
        # still shutting down would die with 143 instead of 75.
        preempted = True
        raise
    finally:
        if not preempted:
            flag.uninstall()


def _train(cfg: FinetuneConfig, task: Task, flag: PreemptionFlag) -> dict[str, Any]:
    accelerator = make_accelerator(cfg)
    set_seed(cfg.run.seed)  # same init and same shuffles on every process and every process count
    run_dir = make_run_dir(cfg.run.root, cfg.run.name)
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / REQUEUE_MARKER).unlink(missing_ok=True)  # a stale one from the run this one resumes
    resume_from = find_resume(cfg, run_dir / "checkpoints")  # a wrong run.resume is refused before any loading
    logger = MetricsLogger(run_dir, enabled=accelerator.is_main_process, tensorboard=False)
    try:
        body = build_step(cfg, task, accelerator, run_dir, resume_from, logger)
        step = run_steps(body, flag, run_dir)
        metrics = body.metrics or task.evaluate(body.model, body.val_loader, accelerator)  # resumed after the end
        task.write_results(body.model, body.val_loader, accelerator, run_dir, metrics)
        best = {f"best_{task.primary}": max(body.best, metrics[task.primary])}
        result = dict(metrics, **best, steps=step, epochs=body.batches.epoch + 1, task=cfg.task, primary=task.primary,
                      num_processes=accelerator.num_processes, mode=cfg.mode, init=cfg.model.init or "scratch",
                      train_images=len(body.batches.loader.dataset), mixed_precision=accelerator.mixed_precision)
        if accelerator.is_main_process:
            (run_dir / "results.json").write_text(json.dumps(result, indent=2))
    finally:
        logger.close()
    accelerator.wait_for_everyone()
    return result


def run_steps(body: FinetuneStep, flag: PreemptionFlag, run_dir: Path) -> int:
    """The skeleton's loop over `body` from where the run stands to its last step; returns the step reached.
    On preemption: the requeue marker, then :class:`Preempted` goes on up."""
    cfg, accelerator, batches = body.cfg, body.accelerator, body.batches
    loop = LoopConfig(steps=body.total_steps, log_every=cfg.run.log_every, samples_per_step=cfg.data.batch_size,
                      totals=("skipped_samples",), faults=cfg.debug)
    hooks = ([body.update_ema] if body.ema is not None else []) + [body.end_epoch]
    bar = progress(body.total_steps, desc=f"{cfg.mode} {cfg.run.name}", enabled=accelerator.is_main_process,
                   initial=body.start_step)
    try:
        return train_loop(body, iter(batches), loop, body.start_step, rank=accelerator.process_index,
                          device=accelerator.device, flag=flag, log=body.logger.log, hooks=hooks,
                          on_window=lambda step, metrics: {"lr": body.lr, "epoch": batches.epoch}, bar=bar)
    except Preempted as stop:
        mark_requeue(body, flag, run_dir, stop.step)
        raise
    finally:
        bar.close()


def mark_requeue(body: FinetuneStep, flag: PreemptionFlag, run_dir: Path, step: int) -> None:
    """Every process, after the preemption save (whose barrier every process has passed, so `latest` names
    it): the main process marks the run for requeue; no process exits before the marker is there."""
    accelerator, batches, tag = body.accelerator, body.batches, body.saved_tag
    if accelerator.is_main_process:
        write_atomic(run_dir / REQUEUE_MARKER, json.dumps({"checkpoint": tag.name, "step": step, "epoch": batches.epoch,
                                                          "epoch_step": batches.epoch_step,
                                                          "signal": flag.signal_name}))
    accelerator.wait_for_everyone()  # a launcher kills the rest once one process has exited
    print(f"[finetune] process {accelerator.process_index}: stopped at step {step} (epoch {batches.epoch}, batch "
          f"{batches.epoch_step} of {batches.steps_per_epoch}; "
          f"{flag.signal_name if flag.requested else 'another process'} signalled), saved {tag.name}; "
          f"exit {REQUEUE_EXIT_CODE} to requeue", flush=True)


def resolved_and_checked(cfg: FinetuneConfig) -> FinetuneConfig:
    """The task's options section, then the task's own checks: a wrong value is one line naming its key,
    before any work."""
    cfg = resolve_task(cfg)
    try:
        check_config(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise BadValue(str(err)) from None
    return cfg


def main(argv: Optional[list[str]] = None) -> int:
    """User errors (bad keys, missing paths, empty data, refused checkpoints): one line on rank 0, exit 2."""
    return run_main("finetune", lambda: _main(argv))


def _main(argv: Optional[list[str]]) -> int:
    cfg = parse_cli(FinetuneConfig, argv, prog="finetune", description="fine-tune or linearly probe a ViT",
                    finish=resolved_and_checked)
    try:
        result = train(cfg)
    except Preempted as stop:
        return stop.code  # REQUEUE_EXIT_CODE
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}))
    return 0
