"""The method contract: what a pretraining method gives the trainer.

A method file (beit.py, milan.py, mae.py, eva.py, simmim.py) turns its config section into an
:class:`Objective`; the trainer runs any of them the same way, knowing no method by name:

    batch = stream batch                              # "image" [, "image_tok"] [, "mask", "ids_keep"]
    batch |= objective.targets(batch)                 # no grad, outside the engine: "ids" / "target" [, "scores"]
    batch |= objective.masks(B, generator, scores)    # only for a mask source that needs the scores
    out = engine(batch)                               # objective.model: {"loss", scalar metrics}

Masks come from one interface (`mimkit.data.masking.MaskSource`): a source that needs nothing but the
grid is drawn in the data workers (handed to the stream), one that needs the targets' scores (MILAN's
guided masking) right after the targets. Either way the model reads `batch["mask"]` / `batch["ids_keep"]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
import torch.nn as nn

from mimkit.data.masking import MaskSource
from mimkit.data.transforms import SecondView


class Targets(Protocol):
    """The frozen half of a method (a tokenizer, a teacher, or the pixels themselves): never in the
    engine or its checkpoint, called under no-grad before the engine's forward."""

    def to(self, device: torch.device) -> "Targets": ...

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the model learns to predict ("ids" or "target"), and "scores" [B, N] when a mask
        source needs them."""

    def describe(self) -> dict[str, Any]:
        """What an export records about the targets: {"tokenizer": ...} or {"teacher": ...} or {}."""


# (model, batch, path) -> None: a picture of this batch. The model is the engine's module.
Picture = Callable[[nn.Module, dict, Path], None]


@dataclass
class Objective:
    model: nn.Module  # trainable, goes into the engine (encoder as `model.encoder`): model(batch) -> {"loss", ...}
    targets: Targets
    masks: MaskSource
    second_view: Optional[SecondView] = None  # a second view of each crop (BEiT's tokenizer view)
    picture: Optional[Picture] = None
    picture_runs_model: bool = False  # the picture runs the model: it needs every parameter (not under ZeRO-3)
    export_meta: dict[str, Any] = field(default_factory=dict)  # extra fields for the export's mimkit.json


@dataclass(frozen=True)
class Method:
    """An entry of the objective table: the method's config section and how to build it."""

    config: type  # the dataclass of the run's `method:` section
    build: Callable[[Any, Any], Objective]  # (PretrainConfig, method section) -> Objective
