"""Train a visual tokenizer (dVAE, PeCo VQGAN, VQ-KD) on the shard stream with the pretraining engine.

    setup: process group (the engine) -> tokenizer (+ discriminator) in the engine; frozen perceptual
           network / teacher outside it -> stream -> fixed picture batch
    loop:  batch -> [frozen teacher targets] -> engine forward (the codebook's k-means init, EMA and
           restarts happen inside) -> [+ perceptual] -> engine.train_step -> logs, usage, pictures, saves
    end:   usage + histogram, reconstructions, the tokenizer export (rank 0), a check batch of ids
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from mimkit.checkpoint.export_format import shard_list_hash
from mimkit.checkpoint.store import CheckpointStore
from mimkit.checkpoint.tokenizer_export import build_tokenizer_model, save_tokenizer_export
from mimkit.config import save_config, to_dict
from mimkit.data.stream import build_stream
from mimkit.distributed.engine import Engine
from mimkit.distributed.preempt import REQUEUE_EXIT_CODE, PreemptionFlag
from mimkit.models.codebook import VectorQuantizer, all_reduce_sum_, usage_stats
from mimkit.optim import Schedule, apply_schedule, param_groups
from mimkit.runlog import MetricsLogger, make_run_dir, progress
from mimkit.teachers import Teacher, build_teacher
from mimkit.tokenizers.config import TokenizerTrainConfig
from mimkit.tokenizers.losses import (
    PatchDiscriminator,
    PerceptualLoss,
    generator_adversarial_loss,
    hinge_discriminator_loss,
)

CHECK_FILE = "tokenizer_check.pt"  # a batch of images and the ids the trained model gave them


class TokenizerTrainee(nn.Module):
    """What goes into the engine: the tokenizer, and the discriminator when the adversarial term is on."""

    def __init__(self, tokenizer: nn.Module, discriminator: nn.Module | None = None, adv_weight: float = 0.0,
                 adv_start: int = 0):
        super().__init__()
        self.tokenizer = tokenizer
        self.discriminator = discriminator
        self.adv_weight, self.adv_start = adv_weight, adv_start

    def forward(self, images: torch.Tensor, target: torch.Tensor | None = None, step: int = 0) -> dict:
        if target is None:
            out = self.tokenizer(images, step=step)
        else:
            out = self.tokenizer(images, target, step=step)
        if self.discriminator is not None:
            d_loss = hinge_discriminator_loss(self.discriminator(images), self.discriminator(out["recon"].detach()))
            g_loss = generator_adversarial_loss(self.discriminator, out["recon"])
            g_weight = self.adv_weight if step >= self.adv_start else 0.0
            out["loss"] = out["loss"] + d_loss + g_weight * g_loss
            out["disc_loss"], out["gen_adv_loss"] = d_loss.detach(), g_loss.detach()
        return out


def build_perceptual(cfg: TokenizerTrainConfig) -> PerceptualLoss:
    """PeCo's perceptual loss on the tower of the teacher `perceptual.teacher` names."""
    p = cfg.perceptual
    return PerceptualLoss.from_teacher(build_teacher(p.teacher, "perceptual.teacher"), p.layers,
                                       cfg.data.mean, cfg.data.std)


def build_vqkd_teacher(cfg: TokenizerTrainConfig) -> Teacher:
    """VQ-KD's target network, `teacher`; its token width must be the one the decoder regresses."""
    teacher = build_teacher(cfg.teacher, "teacher")
    if teacher.output_dim != cfg.vqkd.teacher_dim:
        raise ValueError(f"vqkd.teacher_dim={cfg.vqkd.teacher_dim} but the teacher gives {teacher.output_dim}-d tokens")
    return teacher


def endless(loader) -> Iterator[dict]:
    while True:
        yield from loader


class CodeUsage:
    """Code counts since the last report, summed over ranks when read."""

    def __init__(self, vocab: int):
        self.counts = torch.zeros(vocab, dtype=torch.float64)

    def add(self, ids: torch.Tensor) -> None:
        self.counts += torch.bincount(ids.detach().flatten().cpu(), minlength=self.counts.numel()).double()

    def report(self) -> tuple[dict[str, float], torch.Tensor]:
        """(usage stats, global counts); collective; resets the window."""
        total = all_reduce_sum_(self.counts.clone())
        self.counts.zero_()
        return usage_stats(total), total


def keep_codebooks_fp32(module: nn.Module) -> None:
    """The engine casts the module to its dtype; EMA statistics stay fp32 (bf16 EMA drifts)."""
    for m in module.modules():
        if isinstance(m, VectorQuantizer):
            m.float()


class Preempted(SystemExit):
    """Raised on every rank after the checkpoint a preemption signal asked for: exit code 75, requeue."""

    def __init__(self, step: int):
        super().__init__(REQUEUE_EXIT_CODE)
        self.step = step


def train(cfg: TokenizerTrainConfig) -> Path:
    """Train, export, return the run folder. A preemption signal (Slurm's USR1 warning, submitit's USR2,
    SIGTERM) makes every rank save at the next step boundary and raise :class:`Preempted`."""
    flag = PreemptionFlag().install()
    try:
        return _train(cfg, flag)
    finally:
        flag.uninstall()


def _train(cfg: TokenizerTrainConfig, flag: PreemptionFlag) -> Path:
    torch.manual_seed(cfg.run.seed)
    kind = cfg.kind
    data_cfg = dataclasses.replace(cfg.data, seed=cfg.run.seed + cfg.data.seed)
    tokenizer = build_tokenizer_model(kind, dataclasses.asdict(cfg.arch))
    disc = None
    if cfg.adversarial.enabled:
        if kind == "vqkd":
            raise ValueError("adversarial.enabled: VQ-KD reconstructs features, not pixels")
        disc = PatchDiscriminator(cfg.adversarial.channels, cfg.adversarial.layers)
    model = TokenizerTrainee(tokenizer, disc, cfg.adversarial.weight, cfg.adversarial.start_step)

    groups = param_groups(model, cfg.optim.weight_decay)
    engine = Engine(model, groups, cfg.engine, micro_batch_size=data_cfg.batch_size, betas=cfg.optim.betas,
                    eps=cfg.optim.eps)
    keep_codebooks_fp32(engine.module)
    rank, world = engine.rank, engine.world_size
    global_batch = data_cfg.batch_size * world * cfg.engine.grad_accum
    schedule = Schedule.from_config(cfg.optim, cfg.run.steps, global_batch)

    run_dir = make_run_dir(cfg.run.root, cfg.run.name)
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
    # frozen networks: outside the engine, no grad, eval
    perceptual = build_perceptual(cfg).to(engine.device) if kind == "peco" and cfg.perceptual.weight > 0 else None
    teacher = build_vqkd_teacher(cfg).to(engine.device) if kind == "vqkd" else None

    loader = build_stream(data_cfg, rank=rank, world_size=world)
    store = CheckpointStore(run_dir / "checkpoints", keep=cfg.run.keep_checkpoints)
    step, samples = 0, 0
    resumed = store.load(engine, cfg.run.resume) if cfg.run.resume != "none" else None
    if resumed is not None:
        state, data_state = resumed
        step, samples = int(state["step"]), int(state["samples"])
        loader.load_state_dict(data_state)
    batches = endless(loader)
    one_batch = build_stream(dataclasses.replace(data_cfg, num_workers=0), rank=0, world_size=1)
    fixed = loader.device_transform(next(iter(one_batch)))["image"]
    fixed = fixed[: cfg.run.picture_count].to(engine.device)

    usage = CodeUsage(tokenizer.vocab_size)
    pictures = run_dir / "pictures"
    logger = MetricsLogger(run_dir)
    bar = progress(total=cfg.run.steps, desc=f"tokenizers/{kind}", initial=step)
    tic = time.time()
    while step < cfg.run.steps:
        images = engine.to_model(loader.device_transform(next(batches)))["image"]
        target = None
        if teacher is not None:
            with torch.no_grad():
                from mimkit.models.vqkd import align_teacher_tokens

                tokens = teacher(images, source_mean=data_cfg.mean, source_std=data_cfg.std).tokens
                target = align_teacher_tokens(tokens, cfg.vqkd.grid).to(images.dtype)
        lr = schedule.lr_at(step)
        apply_schedule(engine.ds_optimizer, lr, schedule.weight_decay_at(step))
        out = engine(images, target, step=step)
        loss = out["loss"]
        if perceptual is not None:
            out["perceptual_loss"] = perceptual(images, out["recon"])
            loss = loss + cfg.perceptual.weight * out["perceptual_loss"]
            out["perceptual_loss"] = out["perceptual_loss"].detach()
        usage.add(out["ids"])
        result = engine.train_step(loss)
        if not result.boundary:
            continue
        step += 1
        samples += global_batch
        bar.update(1)
        if step % cfg.run.log_every == 0 or step == cfg.run.steps:
            elapsed, tic = time.time() - tic, time.time()
            scalars = {k: float(v) for k, v in out.items() if k not in ("loss", "recon", "ids") and v.numel() == 1}
            logger.log(step, samples=samples, loss=result.loss, lr=lr, grad_norm=result.grad_norm,
                       skipped=result.skipped, images_per_s=global_batch * cfg.run.log_every / max(elapsed, 1e-9),
                       **scalars)
            bar.set_postfix(loss=f"{result.loss:.4f}")
        if step % cfg.run.usage_every == 0 or step == cfg.run.steps:
            stats, counts = usage.report()
            logger.log(step, samples=samples, **stats)
            if rank == 0 and step == cfg.run.steps:
                from mimkit.pictures import save_codebook_usage

                save_codebook_usage(counts.numpy(), pictures / f"codebook_usage_{step:08d}.png")
        if cfg.run.picture_every and (step % cfg.run.picture_every == 0 or step == cfg.run.steps):
            with full_parameters(engine):
                save_reconstruction_picture(engine.module.tokenizer, fixed, data_cfg, pictures / f"recon_{step:08d}.png")
        saved = cfg.run.save_every and step % cfg.run.save_every == 0 and step < cfg.run.steps
        if saved:
            store.save(engine, step, {"samples": samples, "config": to_dict(cfg)}, loader.state_dict())
        if step == cfg.debug.signal_at_step and rank == cfg.debug.signal_rank:
            os.kill(os.getpid(), signal.SIGUSR1)  # what Slurm's --signal=USR1@120 does (tests)
        if step < cfg.run.steps and flag.should_stop():  # collective: every rank asks at every step
            if not saved:
                store.save(engine, step, {"samples": samples, "config": to_dict(cfg)}, loader.state_dict())
            bar.close()
            logger.log(step, samples=samples, event="preempted")
            logger.close()
            raise Preempted(step)
    bar.close()

    tok_module = engine.module.tokenizer
    with full_parameters(engine):
        if rank == 0:
            write_export(cfg, tok_module, fixed, run_dir, step, samples, teacher, data_cfg)
    logger.close()
    if dist.is_initialized() and world > 1:
        dist.barrier()  # the export is on disk before any rank returns
    return run_dir


def full_parameters(engine: Engine):
    """Under ZeRO-3 every rank gathers the full parameters (collective); a no-op otherwise."""
    import contextlib

    if engine.cfg.zero_stage < 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


def write_export(cfg: TokenizerTrainConfig, tok_module: nn.Module, fixed: torch.Tensor, run_dir: Path, step: int,
                 samples: int, teacher, data_cfg) -> None:
    """The tokenizer export, and a check file: a fixed batch and the ids the trained model gives it."""
    meta = {"input_size": data_cfg.image_size, "interpolation": data_cfg.interpolation,
            "mean": list(data_cfg.mean), "std": list(data_cfg.std), "step": step, "samples_seen": samples,
            "data_shards_hash": shard_list_hash(data_cfg.shards), "run": cfg.run.name,
            "teacher": teacher.meta if teacher is not None else None, "config": to_dict(cfg)}
    save_tokenizer_export(tok_module, run_dir / "export", meta, include_decoder=cfg.export.include_decoder)
    tok_module.eval()
    torch.save({"images": fixed.float().cpu(), "ids": tok_module.tokenize(fixed).cpu()}, run_dir / CHECK_FILE)


@torch.no_grad()
def save_reconstruction_picture(tokenizer: nn.Module, images: torch.Tensor, data_cfg, path: Path) -> None:
    """Originals and their reconstructions through the codes (rank 0; pixel tokenizers only)."""
    if tokenizer.kind == "vqkd" or not (dist.get_rank() == 0 if dist.is_initialized() else True):
        return
    from mimkit.pictures import denormalize, save_reconstructions

    was_training = tokenizer.training
    tokenizer.eval()
    recon = tokenizer.decode_ids(tokenizer.tokenize(images)).float()
    tokenizer.train(was_training)
    save_reconstructions(denormalize(images.float().cpu(), data_cfg.mean, data_cfg.std),
                         denormalize(recon.cpu(), data_cfg.mean, data_cfg.std), path)
