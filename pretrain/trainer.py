"""The pretraining loop: any objective from `objectives.py` on the DeepSpeed engine.

    deepspeed pretrain --config configs/pretrain/beit_vit_b16.yaml beit.tokenizer=runs/tok/export
    torchrun --nproc_per_node 2 -m mimkit.pretrain --config configs/pretrain/beit_tiny_cpu.yaml

Per step: schedule -> (per micro-batch) batch -> targets under no-grad (frozen tokenizer / teacher,
outside the engine) -> model forward in the engine -> `train_step` (non-finite steps skipped on every
rank) -> metrics (all-reduced over ranks on log steps) -> checkpoint every `save_every` and at the end
-> export. A resumed run continues the same data stream, masks and RNG, so it repeats the losses of an
uninterrupted run exactly (fp32).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mimkit.checkpoint.store import CheckpointStore
from mimkit.config import parse_cli, save_config, to_dict
from mimkit.data.stream import build_stream, derive_seed
from mimkit.distributed.engine import Engine, build_ds_config, environment_summary
from mimkit.distributed.preempt import REQUEUE_EXIT_CODE, PreemptionFlag
from mimkit.optim import Schedule, param_groups
from mimkit.pretrain.config import PretrainConfig
from mimkit.pretrain.objectives import build_objective
from mimkit.runlog import MetricsLogger, make_run_dir, progress


class WindowMeter:
    """Scalar metrics summed over the micro-batches since the last log, averaged over ranks on read."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.skipped_samples = 0
        self.started = time.perf_counter()

    def add(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if value is None:
                continue
            value = float(value.detach()) if torch.is_tensor(value) else float(value)
            if value == value and abs(value) != float("inf"):  # a skipped NaN step must not poison the mean
                self.sums[key] += value
                self.counts[key] += 1

    def read(self) -> dict[str, float]:
        """Collective: every rank calls it on the same steps. Means over ranks and micro-batches."""
        keys = sorted(self.sums)
        t = torch.tensor([self.sums[k] for k in keys] + [self.counts[k] for k in keys] + [self.skipped_samples],
                         dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t)
        n = len(keys)
        out = {k: t[i].item() / max(1.0, t[n + i].item()) for i, k in enumerate(keys)}
        out["skipped_samples"] = int(t[-1].item())
        return out

    def seconds(self) -> float:
        return time.perf_counter() - self.started


def _apply_data_overrides(cfg: PretrainConfig, targets: Any) -> dict:
    """The objective fixes parts of the data pipeline (the tokenizer view follows the tokenizer export)."""
    overrides = targets.data_overrides() if hasattr(targets, "data_overrides") else {}
    for key, value in overrides.items():
        setattr(cfg.data, key, value)
    return overrides


def _batches(stream):
    """Endless: the stream yields one epoch (the rest of it after a resume) per iteration."""
    while True:
        yield from stream


def export_meta_from_config(cfg: PretrainConfig) -> dict[str, Any]:
    """Temporary (until the objectives say it themselves): the checkpoint's ``export_meta`` for `mimkit
    export` (method, tokenizer, teacher), read from the objective's own config section."""
    def first_under(tree: Any, key: str) -> Any:  # the objective sections nest these
        if isinstance(tree, dict):
            if tree.get(key) not in (None, "", {}):
                return tree[key]
            for value in tree.values():
                found = first_under(value, key)
                if found is not None:
                    return found
        return None

    section = to_dict(cfg).get("beit" if cfg.objective in ("beit", "peco", "beitv2") else cfg.objective) or {}
    regresses_teacher = section.get("target", "clip") == "clip"  # MAE's teacher section holds unused defaults
    return {"method": cfg.objective, "tokenizer": first_under(section, "tokenizer"),
            "teacher": first_under(section, "teacher") if regresses_teacher else None}


def _save(store: CheckpointStore, engine: Engine, cfg: PretrainConfig, step: int, samples: int, stream,
          targets) -> None:
    client = {"samples": samples, "objective": cfg.objective, "config": to_dict(cfg),
              "export_meta": export_meta_from_config(cfg)}
    store.save(engine, step, client, rank_state={"stream": stream.state_dict(), "targets": targets.state_dict()})


def _picture(cfg: PretrainConfig, engine: Engine, targets, batch, t, run_dir: Path, step: int) -> None:
    """Rank 0 only. Pictures that run the model need every parameter here, so not under ZeRO-3."""
    if engine.rank != 0 or not hasattr(targets, "picture"):
        return
    if engine.cfg.zero_stage == 3 and cfg.objective not in ("beit", "peco", "beitv2"):
        return
    try:
        targets.picture(engine.module, batch, t, run_dir / "pictures" / f"masks_{step:07d}.png")
    except Exception as err:  # a picture never ends a run
        print(f"[pretrain] picture at step {step} failed: {err}", file=sys.stderr)


def _export(run_dir: Path, engine: Engine) -> None:
    try:
        from mimkit.checkpoint.export import export_run
    except ImportError:
        return
    if engine.rank == 0:
        out = export_run(run_dir)
        print(f"[pretrain] export written to {out}")
    if dist.is_initialized():
        dist.barrier()


def train(cfg: PretrainConfig) -> int:
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model, targets = build_objective(cfg)
    data_overrides = _apply_data_overrides(cfg, targets)
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay, cfg.model.depth)
    engine = Engine(model, groups, cfg.engine, cfg.data.batch_size, cfg.optim.betas, cfg.optim.eps)
    rank, world = engine.rank, engine.world_size
    if hasattr(targets, "to"):
        targets.to(engine.device)
    torch.manual_seed(derive_seed(cfg.run.seed, rank, 1))  # drop path differs across ranks

    global_batch = cfg.data.batch_size * world * cfg.engine.grad_accum
    schedule = Schedule.from_config(cfg.optim, cfg.run.steps, global_batch)
    run_dir = make_run_dir(cfg.run.root, cfg.run.name)
    stream = build_stream(cfg.data, rank=rank, world_size=world, mask_fn=getattr(targets, "mask_fn", None))
    store = CheckpointStore(run_dir / "checkpoints", cfg.run.keep)

    step, samples = 0, 0
    loaded = store.load(engine, cfg.run.resume)
    if loaded is not None:
        state, mine = loaded
        step, samples = int(state["step"]), int(state["samples"])
        stream.load_state_dict(mine["stream"])
        targets.load_state_dict(mine["targets"])

    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
        env = environment_summary(engine)
        env.update(objective=cfg.objective, global_batch=global_batch, resumed_from_step=step if loaded else None,
                   lr_resolved=schedule.lr, lr_rule=(f"lr {cfg.optim.lr} x {global_batch} / {cfg.optim.base_batch_size}"
                                                     if cfg.optim.base_batch_size else "lr as given (no batch scaling)"),
                   data_overrides=data_overrides, ds_config=build_ds_config(cfg.engine, cfg.data.batch_size, world),
                   trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad))
        (run_dir / "environment.json").write_text(json.dumps(env, indent=1, default=str))
        print(f"[pretrain] {cfg.objective} on {world} rank(s), ZeRO-{cfg.engine.zero_stage} {cfg.engine.precision}, "
              f"global batch {global_batch}, lr {schedule.lr:.3g} ({env['lr_rule']}), start step {step} "
              f"-> {cfg.run.steps}; run folder {run_dir}", flush=True)

    logger = MetricsLogger(run_dir)
    bar = progress(total=cfg.run.steps, initial=step, desc=cfg.objective, unit="step")
    flag = PreemptionFlag().install()
    batches = _batches(stream)
    meter = WindowMeter()
    batches_seen = 0
    picture_every = getattr(targets, "picture_every", 0) or cfg.run.picture_every
    first_step = step
    exit_code = 0
    try:
        while step < cfg.run.steps:
            engine.set_schedule(schedule.lr_at(step), schedule.weight_decay_at(step))
            if step == cfg.debug.kill_at_step and rank == cfg.debug.kill_rank:
                os.kill(os.getpid(), signal.SIGKILL)  # a crashed node: no cleanup, no save
            for _ in range(cfg.engine.grad_accum):
                batch = engine.to_model(stream.device_transform(next(batches)))
                batches_seen += 1
                meter.skipped_samples += int(batch.pop("skipped", 0))
                with torch.no_grad():
                    t = targets(batch)
                out = engine(batch, t)
                loss = out["loss"]
                if step == cfg.debug.nan_at_step and cfg.debug.nan_rank in (-1, rank):
                    loss = loss * float("nan")
                result = engine.train_step(loss)
                meter.add({k: v for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1})
                meter.add({"grad_norm": result.grad_norm} if result.boundary else {})
            step += 1
            samples += global_batch
            if step == first_step + 1 or (picture_every and step % picture_every == 0):
                _picture(cfg, engine, targets, batch, t, run_dir, step)
            if step % cfg.run.log_every == 0 or step == cfg.run.steps:
                seconds = meter.seconds()
                metrics = meter.read()
                metrics.update(samples=samples, lr=result.lr, skipped_steps=engine.skipped_steps)
                steps_in_window = cfg.run.log_every if step % cfg.run.log_every == 0 else step % cfg.run.log_every
                metrics["samples_per_s"] = round(steps_in_window * global_batch / max(seconds, 1e-9), 2)
                logger.log(step, **metrics)
                bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", sps=metrics["samples_per_s"])
                meter = WindowMeter()
            bar.update(1)
            if step % cfg.run.save_every == 0 or step == cfg.run.steps:
                _save(store, engine, cfg, step, samples, stream, targets)
            if flag.should_stop():  # collective: any rank signalled -> all save and requeue
                if step % cfg.run.save_every and step != cfg.run.steps:
                    _save(store, engine, cfg, step, samples, stream, targets)
                exit_code = REQUEUE_EXIT_CODE
                break
        counts = [batches_seen] * world
        if dist.is_initialized() and world > 1:
            dist.all_gather_object(counts, batches_seen)
        logger.log(step, samples=samples, batches_per_rank=counts, skipped_steps=engine.skipped_steps,
                   skipped_samples_total=stream.skipped, event="end" if exit_code == 0 else "preempted")
    finally:
        bar.close()
        logger.close()
        flag.uninstall()
    if exit_code == 0 and cfg.run.export:
        _export(run_dir, engine)
    return exit_code


def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(PretrainConfig, argv, prog="pretrain",
                    description="Masked image modeling pretraining (BEiT / PeCo / BEiT v2 / MILAN / MAE / EVA)")
    code = train(cfg)
    if dist.is_initialized():
        dist.destroy_process_group()
    return code
