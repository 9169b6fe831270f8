"""Pretraining: any objective from `objectives.py` on the DeepSpeed engine, run by the shared loop
skeleton (`mimkit.distributed.loop`).

    deepspeed pretrain --config configs/pretrain/beit_vit_b16.yaml method.tokenizer=runs/tok/export
    torchrun --nproc_per_node 2 -m mimkit.pretrain --config configs/pretrain/beit_tiny_cpu.yaml

`train` is the setup (objective, engine, stream, checkpoint store, resume); `PretrainStep` is the loop
body: per micro-batch, batch -> targets under no-grad (frozen tokenizer / teacher, outside the engine)
-> masks that need the targets -> the model in the engine -> `train_step` (non-finite steps skipped on
every rank). A resumed run continues the same data stream, masks and RNG, so it repeats the losses of
an uninterrupted run exactly (fp32).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mimkit.checkpoint.export import export_run
from mimkit.checkpoint.store import CheckpointStore
from mimkit.config import parse_cli, save_config, to_dict
from mimkit.data.stream import SKIP_TOTALS, StreamLoader, build_stream, derive_seed, expand_shards, pop_skip_metrics, skip_totals
from mimkit.distributed.engine import Engine, build_ds_config, environment_summary
from mimkit.distributed.loop import LoopConfig, Preempted, endless, train_loop
from mimkit.distributed.preempt import PreemptionFlag
from mimkit.errors import run_main
from mimkit.models.sdpa import count_attention_kernels
from mimkit.optim import Schedule, param_groups
from mimkit.pretrain.config import PretrainConfig
from mimkit.pretrain.knn_monitor import KnnMonitor, check_knn_section
from mimkit.pretrain.objective import Objective
from mimkit.pretrain.objectives import build_objective, method_help, resolve_method
from mimkit.runlog import MetricsLogger, make_run_dir, progress


def mask_generator(seed: int, rank: int, index: int) -> torch.Generator:
    """The CPU generator of the `index`-th micro-batch's masks on `rank`: a function of the position
    alone, so a resumed run draws the same masks without saving any state."""
    return torch.Generator().manual_seed(derive_seed(seed, rank, index))


class PretrainStep:
    """The loop body (`mimkit.distributed.loop.StepBody`) of a pretraining run."""

    def __init__(self, cfg: PretrainConfig, engine: Engine, objective: Objective, stream: StreamLoader,
                 schedule: Schedule, store: CheckpointStore, run_dir: Path):
        self.cfg, self.engine, self.objective, self.stream = cfg, engine, objective, stream
        self.schedule, self.store, self.run_dir = schedule, store, run_dir
        self.global_batch = cfg.data.batch_size * engine.world_size * cfg.engine.grad_accum
        self.batch: dict | None = None  # the last micro-batch, for pictures
        self.lr = 0.0
        self.saved_step = -1
        self.batches_seen = 0  # by this process, in this run
        self.samples_offset = 0  # set on resume: samples seen = step x global batch + this (see `samples`)

    def samples(self, step: int) -> int:
        """Samples seen by the end of `step`: the checkpoint's count plus this run's global batches (a run
        resumed on another world size has another global batch than the steps before it)."""
        return step * self.global_batch + self.samples_offset

    def begin_step(self, step: int) -> None:
        self.engine.set_schedule(self.schedule.lr_at(step), self.schedule.weight_decay_at(step))
        self.micro = 0

    def micro_step(self, step: int, raw: dict) -> dict[str, Any]:
        raw = self.stream.device_transform(raw)  # before the skip counts: decode_on_device may add to them
        skips = pop_skip_metrics(raw)
        batch = self.engine.to_model(raw)
        # A fresh run's first micro-batch says which attention kernel each part gets. Only step 1 of a run
        # that starts at 0, on every rank: the probe (a TorchFunctionMode) turns off fast paths such as
        # nn.MultiheadAttention's, so a resumed run must not probe where the uninterrupted one did not. Not
        # under engine.compile: the probe would be traced into the graph.
        probe = step == 1 and self.micro == 0 and not self.cfg.engine.compile
        with torch.no_grad(), count_attention_kernels(probe) as targets_kernels:
            batch.update(self.objective.targets(batch))
            masks = self.objective.masks
            if masks.needs_scores:  # drawn here, not in the stream: they read the targets' scores
                g = mask_generator(self.cfg.run.seed, self.engine.rank, step * self.cfg.engine.grad_accum + self.micro)
                drawn = masks(batch["image"].shape[0], g, batch["scores"])
                batch.update({k: v.to(self.engine.device) for k, v in drawn.items()})
        self.micro += 1
        self.batches_seen += 1
        with count_attention_kernels(probe) as model_kernels:
            out = self.engine(batch)
        if probe and self.engine.rank == 0:
            print(f"[pretrain] attention kernels ({self.engine.device.type}, {self.cfg.engine.precision}): model "
                  f"{model_kernels.summary()}; targets {targets_kernels.summary()}", flush=True)
        result = self.engine.train_step(self.cfg.debug.poison(out["loss"], step, self.engine.rank))
        self.batch, self.lr = batch, result.lr
        metrics = {k: v for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}
        metrics.update(skips)
        if result.boundary:
            metrics["grad_norm"] = result.grad_norm
        return metrics

    def save(self, step: int) -> None:
        cfg = self.cfg
        client = {"samples": self.samples(step), "objective": cfg.objective, "config": to_dict(cfg),
                  "export_meta": {"method": cfg.objective, "tokenizer": None, "teacher": None,
                                  **self.objective.export_meta}}
        self.store.save(self.engine, step, client, rank_state={"stream": self.stream.state_dict()})
        self.saved_step = step

    def picture(self, step: int, first_step: int) -> None:
        """Rank 0, on the first step and every `picture_every`. A picture that runs the model needs every
        parameter on this rank, so not under ZeRO-3."""
        every = self.cfg.run.picture_every
        if self.engine.rank != 0 or self.objective.picture is None or not (
                step == first_step + 1 or (every and step % every == 0)):
            return
        if self.objective.picture_runs_model and self.engine.cfg.zero_stage == 3:
            return
        try:
            self.objective.picture(self.engine.module, self.batch, self.run_dir / "pictures" / f"masks_{step:07d}.png")
        except Exception as err:  # a picture never ends a run
            print(f"[pretrain] picture at step {step} failed: {err}", file=sys.stderr)


def describe_run(cfg: PretrainConfig, engine: Engine, objective: Objective, schedule: Schedule, run_dir: Path,
                 start: int, resumed: bool) -> None:
    """Rank 0: the resolved config, environment.json, and one line saying what runs."""
    global_batch = cfg.data.batch_size * engine.world_size * cfg.engine.grad_accum
    save_config(cfg, run_dir / "config.yaml")
    env = environment_summary(engine)
    rule = (f"lr {cfg.optim.lr} x {global_batch} / {cfg.optim.base_batch_size}" if cfg.optim.base_batch_size
            else "lr as given (no batch scaling)")
    env.update(objective=cfg.objective, global_batch=global_batch, resumed_from_step=start if resumed else None,
               lr_resolved=schedule.lr, lr_rule=rule,
               second_view=dataclasses.asdict(objective.second_view) if objective.second_view else None,
               ds_config=build_ds_config(cfg.engine, cfg.data.batch_size, engine.world_size),
               trainable_params=sum(p.numel() for p in objective.model.parameters() if p.requires_grad))
    (run_dir / "environment.json").write_text(json.dumps(env, indent=1, default=str))
    print(f"[pretrain] {cfg.objective} on {engine.world_size} rank(s), ZeRO-{cfg.engine.zero_stage} "
          f"{cfg.engine.precision}, global batch {global_batch}, lr {schedule.lr:.3g} ({rule}), start step {start} "
          f"-> {cfg.run.steps}; run folder {run_dir}", flush=True)


def train(cfg: PretrainConfig) -> int:
    """Train (and export); returns 0, or REQUEUE_EXIT_CODE after a preemption save."""
    knn = KnnMonitor(cfg)  # opens its labelled sets (if knn.every): before the engine starts
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    expand_shards(cfg.data.shards)  # missing or empty shards: refused before the engine starts
    objective = build_objective(cfg)
    groups = param_groups(objective.model, cfg.optim.weight_decay, cfg.optim.layer_decay, cfg.model.depth)
    engine = Engine(objective.model, groups, cfg.engine, cfg.data.batch_size, cfg.optim.betas, cfg.optim.eps)
    rank, world = engine.rank, engine.world_size
    objective.targets.to(engine.device)
    torch.manual_seed(derive_seed(cfg.run.seed, rank, 1))  # drop path differs across ranks
    global_batch = cfg.data.batch_size * world * cfg.engine.grad_accum
    schedule = Schedule.from_config(cfg.optim, cfg.run.steps, global_batch)
    run_dir = make_run_dir(cfg.run.root, cfg.run.name)
    stream_masks = None if objective.masks.needs_scores else objective.masks
    stream = build_stream(cfg.data, rank=rank, world_size=world, masks=stream_masks,
                          second_view=objective.second_view, device=engine.device, dtype=engine.dtype)
    store = CheckpointStore(run_dir / "checkpoints", cfg.run.keep)
    body = PretrainStep(cfg, engine, objective, stream, schedule, store, run_dir)
    step = 0
    loaded = store.load(engine, cfg.run.resume)
    if loaded is not None:
        state, mine = loaded
        step = int(state["step"])
        stream.load_state_dict(mine["stream"])
        body.samples_offset = int(state.get("samples", step * global_batch)) - step * global_batch
    if rank == 0:
        describe_run(cfg, engine, objective, schedule, run_dir, step, loaded is not None)

    loop = LoopConfig(steps=cfg.run.steps, grad_accum=cfg.engine.grad_accum, log_every=cfg.run.log_every,
                      save_every=cfg.run.save_every, samples_per_step=global_batch, faults=cfg.debug,
                      totals=SKIP_TOTALS, samples_offset=body.samples_offset)
    logger = MetricsLogger(run_dir)
    bar = progress(total=cfg.run.steps, initial=step, desc=cfg.objective, unit="step")
    knn.start(engine, logger, step, write=bar.write)  # a fresh run: the curve's starting point
    flag = PreemptionFlag().install()
    first = step
    try:
        step = train_loop(body, endless(stream), loop, step, rank=rank, device=engine.device, flag=flag,
                          log=logger.log, bar=bar, hooks=[lambda s: body.picture(s, first), knn],
                          on_window=lambda s, m: {"lr": body.lr, "skipped_steps": engine.skipped_steps})
        if body.saved_step != step and step > first:
            body.save(step)
        log_end(logger, engine, body, step)
    except Preempted as stop:
        return int(stop.code)
    finally:
        bar.close()
        logger.close()
        flag.uninstall()
    if cfg.run.export:
        if rank == 0:
            print(f"[pretrain] export written to {export_run(run_dir)}")
        if dist.is_initialized():
            dist.barrier()
    return 0


def log_end(logger: MetricsLogger, engine: Engine, body: PretrainStep, step: int) -> None:
    """The closing record: the batches each rank served in this run, and the skips of all ranks since the
    run began, by reason (collective)."""
    mine = torch.tensor([body.batches_seen], dtype=torch.float64, device=engine.device)
    ranks = [mine.clone() for _ in range(engine.world_size)]
    if dist.is_initialized() and engine.world_size > 1:
        dist.all_gather(ranks, mine)
    logger.log(step, samples=body.samples(step), batches_per_rank=[int(r[0]) for r in ranks],
               skipped_steps=engine.skipped_steps, **skip_totals(body.stream, engine.device), event="end")


def parse_args(argv: list[str] | None = None, prog: str = "pretrain") -> PretrainConfig:
    """`--config FILE key=value ...` -> a PretrainConfig whose `method` is the objective's own section."""
    return parse_cli(PretrainConfig, argv, prog=prog, finish=lambda cfg: check_knn_section(resolve_method(cfg)),
                     more_help=method_help, skip_help=("method",),
                     description="Masked image modeling pretraining (BEiT / PeCo / BEiT v2 / MILAN / MAE / EVA / SimMIM)")


def main(argv: list[str] | None = None) -> int:
    """User errors (bad keys, missing paths, empty data, refused checkpoints): one line on rank 0, exit 2."""
    return run_main("pretrain", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    code = train(parse_args(argv))
    if dist.is_initialized():
        dist.destroy_process_group()
    return code
