"""The `PretrainConfig` schema: run, data, model, engine, optim, knn, debug, and the `method` section.

`objective` picks the method from the table in `objectives.py`; `method` is validated against that
method's own config dataclass (`resolve_method`, at parse time), so a run's config.yaml holds the
settings of its method only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mimkit.data.stream import DataConfig
from mimkit.distributed.engine import EngineConfig
from mimkit.distributed.loop import FaultConfig
from mimkit.knn import KnnConfig
from mimkit.models.vit import ViTConfig
from mimkit.optim import OptimConfig


@dataclass
class RunConfig:
    name: str = "pretrain"  # the run folder is root/name (resume finds it there)
    root: str = "runs"  # parent of run folders
    steps: int = 1000  # optimizer steps (a stream has no length)
    log_every: int = 10  # steps per metrics.jsonl record (means over the window, all ranks)
    save_every: int = 1000  # and always at the end
    keep: int = 2  # checkpoints kept
    resume: str = "auto"  # auto (latest verified checkpoint, else the newest that verifies) | strict (latest or stop) | none | path to a step_* folder
    seed: int = 0  # initial weights, masks, drop path
    picture_every: int = 0  # a picture of the current batch every N steps (0: first step only)
    export: bool = True  # write export/ at the end


@dataclass
class PretrainConfig:
    objective: str = "beit"  # beit | peco | beitv2 | milan | mae | eva (objectives.py)
    method: Any = None  # the objective's section (its dataclass in the method's file); None: its defaults
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ViTConfig = field(default_factory=ViTConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)  # k-NN accuracy of the encoder every knn.every steps (0: off)
    debug: FaultConfig = field(default_factory=FaultConfig)


def load_pretrain_config(config_file=None, overrides=()) -> PretrainConfig:
    """`load_config` plus the objective's `method` section (what `pretrain --config ...` parses)."""
    from mimkit.config import load_config
    from mimkit.pretrain.objectives import resolve_method

    return resolve_method(load_config(PretrainConfig, config_file, overrides))
