"""Train a visual tokenizer (dVAE, PeCo VQGAN, VQ-KD) on the shard stream with the pretraining engine,
run by the shared loop skeleton (`mimkit.distributed.loop`).

`train` is the setup: the tokenizer (+ discriminator) in the engine, the frozen perceptual network or
teacher outside it, the stream, the checkpoint store, a fixed picture batch. `TokenizerStep` is the loop
body: batch -> [frozen teacher targets] -> engine forward (the codebook's k-means init, EMA and restarts
happen inside) -> [+ perceptual] -> engine.train_step; after-step hooks report codebook usage and draw
reconstructions. At the end: the tokenizer export (rank 0) and a check batch of ids.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from mimkit.checkpoint.export_format import shard_list_hash
from mimkit.checkpoint.store import CheckpointStore
from mimkit.checkpoint.tokenizer_export import build_tokenizer_model, save_tokenizer_export
from mimkit.config import save_config, to_dict
from mimkit.data.stream import SKIP_TOTALS, StreamLoader, build_stream, expand_shards, pop_skip_metrics, skip_totals
from mimkit.distributed.engine import Engine
from mimkit.distributed.loop import LoopConfig, endless, train_loop
from mimkit.distributed.preempt import PreemptionFlag
from mimkit.models.codebook import VectorQuantizer, all_reduce_sum_, usage_stats
from mimkit.models.vqkd import align_teacher_tokens
from mimkit.optim import Schedule, param_groups
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
    return PerceptualLoss.from_teacher(build_teacher(p.teacher, "perceptual.teacher", cfg.engine.precision), p.layers,
                                       cfg.data.mean, cfg.data.std)


def build_vqkd_teacher(cfg: TokenizerTrainConfig) -> Teacher:
    """VQ-KD's target network, `teacher`; its token width must be the one the decoder regresses."""
    teacher = build_teacher(cfg.teacher, "teacher", cfg.engine.precision)
    if teacher.output_dim != cfg.vqkd.teacher_dim:
        raise ValueError(f"vqkd.teacher_dim={cfg.vqkd.teacher_dim} but the teacher gives {teacher.output_dim}-d tokens")
    return teacher


class CodeUsage:
    """Code counts since the last report, summed over ranks when read (on the engine's device, so the
    all-reduce works on an NCCL-only process group)."""

    def __init__(self, vocab: int, device: torch.device):
        self.counts = torch.zeros(vocab, dtype=torch.float64, device=device)

    def add(self, ids: torch.Tensor) -> None:
        self.counts += torch.bincount(ids.detach().flatten().to(self.counts.device),
                                      minlength=self.counts.numel()).double()

    def report(self) -> tuple[dict[str, float], torch.Tensor]:
        """(usage stats, global counts on the CPU); collective; resets the window."""
        total = all_reduce_sum_(self.counts.clone())
        self.counts.zero_()
        return usage_stats(total.cpu()), total.cpu()


def keep_codebooks_fp32(module: nn.Module) -> None:
    """The engine casts the module to its dtype; EMA statistics stay fp32 (bf16 EMA drifts)."""
    for m in module.modules():
        if isinstance(m, VectorQuantizer):
            m.float()


class TokenizerStep:
    """The loop body (`mimkit.distributed.loop.StepBody`) of a tokenizer run."""

    def __init__(self, cfg: TokenizerTrainConfig, data_cfg, engine: Engine, stream: StreamLoader,
                 schedule: Schedule, store: CheckpointStore, teacher: Teacher | None,
                 perceptual: PerceptualLoss | None, run_dir: Path, fixed: torch.Tensor):
        self.cfg, self.data_cfg, self.engine, self.stream = cfg, data_cfg, engine, stream
        self.schedule, self.store, self.teacher, self.perceptual = schedule, store, teacher, perceptual
        self.run_dir, self.fixed = run_dir, fixed
        self.global_batch = data_cfg.batch_size * engine.world_size * cfg.engine.grad_accum
        self.usage = CodeUsage(engine.module.tokenizer.vocab_size, engine.device)
        self.lr = 0.0
        self.samples_offset = 0  # set on resume: samples seen = step x global batch + this (another world size)

    def samples(self, step: int) -> int:
        return step * self.global_batch + self.samples_offset

    def begin_step(self, step: int) -> None:
        self.engine.set_schedule(self.schedule.lr_at(step), self.schedule.weight_decay_at(step))

    def micro_step(self, step: int, raw: dict) -> dict:
        raw = self.stream.device_transform(raw)  # before the skip counts: decode_on_device may add to them
        skips = pop_skip_metrics(raw)
        images = self.engine.to_model(raw)["image"]
        target = None
        if self.teacher is not None:  # VQ-KD regresses the frozen teacher's tokens
            with torch.no_grad():
                tokens = self.teacher(images, source_mean=self.data_cfg.mean, source_std=self.data_cfg.std).tokens
                target = align_teacher_tokens(tokens, self.cfg.vqkd.grid).to(images.dtype)
        out = self.engine(images, target, step=step)
        loss = out["loss"]
        if self.perceptual is not None:  # PeCo: deep-feature distance, the frozen network outside the engine
            perceptual = self.perceptual(images, out["recon"])
            loss = loss + self.cfg.perceptual.weight * perceptual
            out["perceptual_loss"] = perceptual.detach()
        self.usage.add(out["ids"])
        result = self.engine.train_step(self.cfg.debug.poison(loss, step, self.engine.rank))
        self.lr = result.lr
        metrics = {k: v for k, v in out.items() if k not in ("loss", "recon", "ids") and v.numel() == 1}
        metrics["loss"] = result.loss
        metrics.update(skips)
        if result.boundary:
            metrics["grad_norm"] = result.grad_norm
        return metrics

    def save(self, step: int) -> None:
        self.store.save(self.engine, step, {"samples": self.samples(step), "config": to_dict(self.cfg)},
                        self.stream.state_dict())

    def report_usage(self, step: int, log) -> None:
        """Collective: codebook usage over the window on every `usage_every` and the last step."""
        if step % self.cfg.run.usage_every and step != self.cfg.run.steps:
            return
        stats, counts = self.usage.report()
        log(step, samples=self.samples(step), **stats)
        if self.engine.rank == 0 and step == self.cfg.run.steps:
            from mimkit.pictures import save_codebook_usage

            save_codebook_usage(counts.numpy(), self.run_dir / "pictures" / f"codebook_usage_{step:08d}.png")

    def picture(self, step: int) -> None:
        """Reconstructions of the fixed batch every `picture_every` and at the last step (collective under ZeRO-3)."""
        every = self.cfg.run.picture_every
        if not every or (step % every and step != self.cfg.run.steps):
            return
        with self.engine.full_parameters():
            save_reconstruction_picture(self.engine.module.tokenizer, self.fixed, self.data_cfg,
                                        self.run_dir / "pictures" / f"recon_{step:08d}.png")


def build_trainee(cfg: TokenizerTrainConfig) -> TokenizerTrainee:
    """What goes into the engine: the tokenizer `kind` names (+ the PatchGAN discriminator)."""
    tokenizer = build_tokenizer_model(cfg.kind, dataclasses.asdict(cfg.arch))
    disc = None
    if cfg.adversarial.enabled:
        if cfg.kind == "vqkd":
            raise ValueError("adversarial.enabled: VQ-KD reconstructs features, not pixels")
        disc = PatchDiscriminator(cfg.adversarial.channels, cfg.adversarial.layers)
    return TokenizerTrainee(tokenizer, disc, cfg.adversarial.weight, cfg.adversarial.start_step)


def train(cfg: TokenizerTrainConfig) -> Path:
    """Train, export, return the run folder. A preemption signal (Slurm's USR1 warning, submitit's USR2,
    SIGTERM) makes every rank save at the next step boundary and raise `Preempted` (exit code 75)."""
    torch.manual_seed(cfg.run.seed)
    data_cfg = dataclasses.replace(cfg.data, seed=cfg.run.seed + cfg.data.seed)
    expand_shards(data_cfg.shards)  # missing or empty shards: refused before the engine starts
    model = build_trainee(cfg)
    engine = Engine(model, param_groups(model, cfg.optim.weight_decay), cfg.engine,
                    micro_batch_size=data_cfg.batch_size, betas=cfg.optim.betas, eps=cfg.optim.eps)
    keep_codebooks_fp32(engine.module)
    global_batch = data_cfg.batch_size * engine.world_size * cfg.engine.grad_accum
    run_dir = make_run_dir(cfg.run.root, cfg.run.name)
    if engine.rank == 0:
        save_config(cfg, run_dir / "config.yaml")
    # frozen networks: outside the engine, no grad, eval
    perceptual = build_perceptual(cfg).to(engine.device) if cfg.kind == "peco" and cfg.perceptual.weight > 0 else None
    teacher = build_vqkd_teacher(cfg).to(engine.device) if cfg.kind == "vqkd" else None
    stream = build_stream(data_cfg, rank=engine.rank, world_size=engine.world_size, device=engine.device,
                          dtype=engine.dtype)
    store = CheckpointStore(run_dir / "checkpoints", keep=cfg.run.keep_checkpoints)
    one_batch = build_stream(dataclasses.replace(data_cfg, num_workers=0, batches_per_epoch=1), rank=0, world_size=1)
    fixed = stream.device_transform(next(iter(one_batch)))["image"][: cfg.run.picture_count]
    fixed = fixed.to(engine.device, torch.float32)
    body = TokenizerStep(cfg, data_cfg, engine, stream, Schedule.from_config(cfg.optim, cfg.run.steps, global_batch),
                         store, teacher, perceptual, run_dir, fixed)
    step = 0
    resumed = store.load(engine, cfg.run.resume)
    if resumed is not None:
        state, data_state = resumed
        step = int(state["step"])
        stream.load_state_dict(data_state)
        body.samples_offset = int(state.get("samples", step * global_batch)) - step * global_batch
    loop = LoopConfig(steps=cfg.run.steps, grad_accum=cfg.engine.grad_accum, log_every=cfg.run.log_every,
                      save_every=cfg.run.save_every, samples_per_step=global_batch, faults=cfg.debug,
                      totals=SKIP_TOTALS, samples_offset=body.samples_offset)
    logger = MetricsLogger(run_dir)
    bar = progress(total=cfg.run.steps, desc=f"tokenizers/{cfg.kind}", initial=step)
    flag = PreemptionFlag().install()
    try:
        step = train_loop(body, endless(stream), loop, step, rank=engine.rank, device=engine.device, flag=flag,
                          log=logger.log, bar=bar, hooks=[lambda s: body.report_usage(s, logger.log), body.picture],
                          on_window=lambda s, m: {"lr": body.lr, "skipped_steps": engine.skipped_steps})
        logger.log(step, samples=body.samples(step), skipped_steps=engine.skipped_steps,
                   **skip_totals(stream, engine.device), event="end")
        master = engine.master_weights()  # every rank: a collective where the master copy is partitioned
        tokenizer_master = {k.removeprefix("tokenizer."): v for k, v in master.items() if k.startswith("tokenizer.")}
        with engine.full_parameters():
            if engine.rank == 0:
                write_export(cfg, engine.module.tokenizer, tokenizer_master, fixed, run_dir, step, body.samples(step),
                             teacher, data_cfg)
    finally:
        bar.close()
        logger.close()
        flag.uninstall()
    if dist.is_initialized() and engine.world_size > 1:
        dist.barrier()  # the export is on disk before any rank returns
    return run_dir


def write_export(cfg: TokenizerTrainConfig, tok_module: nn.Module, weights: dict[str, torch.Tensor], fixed: torch.Tensor,
                 run_dir: Path, step: int, samples: int, teacher, data_cfg) -> None:
    """The tokenizer export (`weights`: the fp32 master weights), and a check file: a fixed batch and the ids
    the trained model gives it (in fp32 training, what the export must give too)."""
    meta = {"input_size": data_cfg.image_size, "interpolation": data_cfg.interpolation,
            "mean": list(data_cfg.mean), "std": list(data_cfg.std), "step": step, "samples_seen": samples,
            "data_shards_hash": shard_list_hash(data_cfg.shards), "run": cfg.run.name,
            "teacher": teacher.meta if teacher is not None else None, "config": to_dict(cfg)}
    save_tokenizer_export(tok_module, run_dir / "export", meta, include_decoder=cfg.export.include_decoder,
                          weights=weights)
    tok_module.eval()
    ids = tok_module.tokenize(fixed)
    torch.save({"images": fixed.float().cpu(), "ids": ids.cpu()}, run_dir / CHECK_FILE)


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
