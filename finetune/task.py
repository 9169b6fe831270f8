"""The task contract: what a fine-tuning task (classification, segmentation, detection) gives the trainer.

The trainer (`trainer.py`) owns everything tasks share: the accelerator, export loading through the
task's model builder, AdamW with layer-wise decay, the per-step schedule, checkpoints, preemption and
resume, the loop (`mimkit.distributed.loop.train_loop`). A task brings the rest, knowing nothing of
checkpoints or processes beyond the collectives its evaluation needs:

    task = TASKS[cfg.task].build(cfg)                      # a TaskSpec: refuses bad settings before any work
    built = task.build_model()                             # network + its ViT encoder (+ load report, export meta)
    train_loader, val_loader = task.build_loaders(built.encoder.cfg.img_size, accelerator)
    out = task.loss(model, batch)                          # per micro-batch, under autocast: {"loss", scalars}
    metrics = task.evaluate(model, val_loader, accelerator)  # collective; metrics[task.primary] ranks runs
    task.write_results(model, val_loader, accelerator, run_dir, metrics)  # collective; tables, pictures

The train loader is a map-style DataLoader of *global* batches: the trainer hands it to
`accelerator.prepare` (split across processes, seedable shuffle, resumable mid-epoch). Its dataset may
define `set_epoch(epoch)` (seeded augmentation); the trainer calls it at each epoch start. The val loader
is the task's own business (classification prepares it with accelerate; segmentation shards the images
itself and sums its confusion counts over processes).

A task file defines a config dataclass (the run's `options:` section; the paper's defaults), a class
following `Task` and a `TaskSpec(options=ItsDataclass, build=cfg -> Task)`; one line in `tasks.py` names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
import torch.nn as nn

from mimkit.checkpoint.load import LoadReport
from mimkit.distributed.lifetime import worker_init_dies_with_parent
from mimkit.models.vit import VisionTransformer


def loader_options(num_workers: int, device: torch.device) -> dict[str, Any]:
    """What every task's DataLoaders share: workers that die with their process, and page-locked batches
    where they go to a GPU (the copy then overlaps compute: accelerate moves them with non_blocking)."""
    return dict(num_workers=num_workers, worker_init_fn=worker_init_dies_with_parent(),
                pin_memory=torch.device(device).type == "cuda")


@dataclass
class BuiltModel:
    model: nn.Module  # the trainable network (what the optimizer, the checkpoints and the EMA see)
    encoder: VisionTransformer  # its ViT: depth for layer-wise decay, input size for the loaders
    report: Optional[LoadReport] = None  # what loading the init did (None: from scratch)
    meta: Optional[dict] = None  # the export's mimkit.json (pixel normalisation), None for foreign files


class Task(Protocol):
    """One fine-tuning run's task, built from its FinetuneConfig (options resolved) by `TaskSpec.build`."""

    primary: str  # the metric a run's best is tracked by (results `best_<primary>`), higher is better

    def build_model(self) -> BuiltModel:
        """The network from `cfg.model.init` (an export or any layout mimkit.checkpoint.load reads) or scratch."""

    def build_loaders(self, img_size: int, accelerator: Any) -> tuple[Any, Any]:
        """(train loader of global batches, not yet prepared; val loader ready for `evaluate`)."""

    def loss(self, model: nn.Module, batch: Any) -> dict[str, Any]:
        """One micro-batch's forward: {"loss": scalar tensor, other scalar metrics} (same keys on every rank)."""

    def evaluate(self, model: nn.Module, loader: Any, accelerator: Any) -> dict[str, float]:
        """Collective: metrics over the whole val set, every image counted once, equal on every process."""

    def describe(self, metrics: dict[str, float]) -> str:
        """One line for the log: the headline metrics."""

    def write_results(self, model: nn.Module, loader: Any, accelerator: Any, run_dir: Path,
                      metrics: dict[str, float]) -> None:
        """Collective, after the last evaluation: extra files in the run folder (tables, pictures)."""


@dataclass(frozen=True)
class TaskSpec:
    """An entry of the task table: the task's config section and how to build it for a run. `build`
    raises ValueError (naming the key and the value) on settings the task cannot run."""

    options: type  # the dataclass of the run's `options:` section
    build: Callable[[Any], Task]  # FinetuneConfig (options resolved) -> Task
