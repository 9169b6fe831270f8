"""The one training-loop skeleton every stage runs (tokenizers, pretraining, fine-tuning, dense tasks).

A stage brings its setup and a :class:`StepBody`; the skeleton owns what every loop needs alike:

    while step < steps:
        faults.before_step             # a rank killed mid-run (tests)
        body.begin_step(step)          # this step's lr / wd
        grad_accum x body.micro_step(step, next(batches))   # forward, backward (+ optimizer at the boundary)
        step += 1
        hooks(step)                    # after-step work: EMA, pictures, evaluation
        log the metric window          # means over micro-batches and ranks, reduced on the body's device
        body.save(step)                # every save_every steps
        faults.after_step              # a preemption signal (tests)
        flag.should_stop()             # collective: any rank signalled -> all save, raise Preempted (exit 75)

The split follows MAE's engine_pretrain.py / main_pretrain.py: the loop apart from the setup. What
a stage saves (a DeepSpeed checkpoint, accelerate's state) is the body's business; the skeleton only
decides when.
"""

from __future__ import annotations

import os
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import torch
import torch.distributed as dist

from mimkit.distributed.preempt import REQUEUE_EXIT_CODE, PreemptionFlag


@dataclass
class FaultConfig:
    """The `debug` section of every stage: faults injected on purpose, for tests."""

    nan_at_step: int = -1  # make the loss NaN at this step...
    nan_rank: int = -1  # ...on this rank (-1: every rank)
    kill_at_step: int = -1  # SIGKILL this process before this step (a crashed node: no save)...
    kill_rank: int = 1  # ...on this rank
    signal_at_step: int = -1  # send SIGUSR1 to this process after this step, as Slurm's warning does...
    signal_rank: int = 0  # ...on this rank

    def kill_if_due(self, step: int, rank: int) -> None:
        if step == self.kill_at_step and rank == self.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)

    def poison(self, loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
        """The loss, or NaN where a NaN step was asked for."""
        if step == self.nan_at_step and self.nan_rank in (-1, rank):
            return loss * float("nan")
        return loss

    def signal_if_due(self, step: int, rank: int) -> None:
        if step == self.signal_at_step and rank == self.signal_rank:
            os.kill(os.getpid(), signal.SIGUSR1)


class Preempted(SystemExit):
    """Raised on every rank after the save a preemption signal asked for. A SystemExit with code 75
    (REQUEUE_EXIT_CODE): an entry point that does not catch it exits 75 and the Slurm script requeues."""

    def __init__(self, step: int):
        super().__init__(REQUEUE_EXIT_CODE)
        self.step = step


def endless(loader: Iterable) -> Iterator:
    """Batches forever: a stream yields one epoch (the rest of it after a resume) per iteration."""
    while True:
        yield from loader


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1)


class WindowMeter:
    """Scalar metrics summed over the micro-batches since the last read; `read` averages them over
    ranks and micro-batches, except the `totals` keys (counts such as skipped samples), which it sums (ints).
    The all-reduce runs on `device` (the engine's), so it works on NCCL-only process groups."""

    def __init__(self, device: torch.device | str = "cpu", totals: Sequence[str] = ()) -> None:
        self.device = torch.device(device)
        self.totals = set(totals)
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.started = time.perf_counter()

    def add(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if value is None or not _is_scalar(value):
                continue
            value = float(value.detach()) if torch.is_tensor(value) else float(value)
            if value == value and abs(value) != float("inf"):  # a skipped NaN step must not poison the mean
                self.sums[key] += value
                self.counts[key] += 1

    def read(self) -> dict[str, float | int]:
        """Collective: every rank calls it at the same steps, with the same keys (the metrics a body
        returns do not depend on the rank). Means over ranks and micro-batches; resets the window."""
        keys = sorted(self.sums)
        t = torch.tensor([self.sums[k] for k in keys] + [float(self.counts[k]) for k in keys],
                         dtype=torch.float64, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t)
        n = len(keys)
        out = {k: round(t[i].item()) if k in self.totals else t[i].item() / max(1.0, t[n + i].item())
               for i, k in enumerate(keys)}
        self.reset()
        return out

    def seconds(self) -> float:
        return time.perf_counter() - self.started


class StepBody(Protocol):
    """What a stage gives the skeleton."""

    def begin_step(self, step: int) -> None:
        """Before the step's first micro-batch: set this step's lr and weight decay."""

    def micro_step(self, step: int, batch: Any) -> dict[str, Any]:
        """Forward and backward of one micro-batch (and the optimizer step at the accumulation
        boundary); returns scalar metrics, `loss` among them, the same keys on every rank."""

    def save(self, step: int) -> None:
        """A checkpoint after `step` (collective). Called at most once per step by the skeleton."""


@dataclass
class LoopConfig:
    steps: int  # optimizer steps to reach
    grad_accum: int = 1  # micro-batches per optimizer step
    log_every: int = 10
    save_every: int = 0  # 0: the skeleton saves only on preemption (the stage saves at its end)
    samples_per_step: int = 0  # global batch: for `samples` and `samples_per_s`
    samples_offset: int = 0  # samples seen that step x samples_per_step does not count (resumed on another world size)
    totals: tuple[str, ...] = ()  # metrics summed over the window and the ranks, not averaged
    faults: FaultConfig = field(default_factory=FaultConfig)


Hook = Callable[[int], None]


def train_loop(body: StepBody, batches: Iterator, cfg: LoopConfig, start_step: int, *, rank: int,
               device: torch.device | str, flag: PreemptionFlag, log: Callable[..., None],
               hooks: Sequence[Hook] = (), on_window: Callable[[int, dict], dict] | None = None,
               bar: Any = None) -> int:
    """Run `body` from `start_step` to `cfg.steps`; returns the step reached.

    `log(step, **metrics)` gets the window means plus `samples` and `samples_per_s` every `log_every`
    steps and at the last; `on_window(step, metrics)` may add to them (lr, skipped steps). `hooks` run
    after every step, on every rank, in order. A preemption raises :class:`Preempted` after the save.
    """
    meter = WindowMeter(device, cfg.totals)
    step = start_step
    window_start = step
    while step < cfg.steps:
        cfg.faults.kill_if_due(step, rank)
        body.begin_step(step)
        for _ in range(cfg.grad_accum):
            meter.add(body.micro_step(step, next(batches)))
        step += 1
        for hook in hooks:
            hook(step)
        if step % cfg.log_every == 0 or step == cfg.steps:
            seconds = meter.seconds()
            metrics = meter.read()
            metrics["samples"] = step * cfg.samples_per_step + cfg.samples_offset
            metrics["samples_per_s"] = round((step - window_start) * cfg.samples_per_step / max(seconds, 1e-9), 2)
            if on_window is not None:
                metrics.update(on_window(step, metrics))
            log(step, **metrics)
            if bar is not None:
                bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", sps=metrics["samples_per_s"])
            window_start = step
        if bar is not None:
            bar.update(1)
        saved = bool(cfg.save_every) and step % cfg.save_every == 0
        if saved:
            body.save(step)
        cfg.faults.signal_if_due(step, rank)
        if flag.should_stop():  # collective: any rank signalled -> every rank saves after this same step
            if not saved:
                body.save(step)
            log(step, samples=step * cfg.samples_per_step + cfg.samples_offset, event="preempted")
            raise Preempted(step)
    return step
