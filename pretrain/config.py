"""The `PretrainConfig` schema: run, data, model, engine, optim, debug, and one section per objective.

`objective` picks the method from the table in `objectives.py`; only its section is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mimkit.data.stream import DataConfig
from mimkit.distributed.engine import EngineConfig
from mimkit.models.vit import ViTConfig
from mimkit.optim import OptimConfig
from mimkit.pretrain.eva import EvaConfig
from mimkit.pretrain.mae import MaeConfig
from mimkit.pretrain.milan import MilanConfig


@dataclass
class RunConfig:
    name: str = "pretrain"
    root: str = "runs"
    steps: int = 1000  # optimizer steps (a stream has no length)
    log_every: int = 10
    save_every: int = 1000  # and always at the end
    keep: int = 2  # checkpoints kept
    resume: str = "auto"  # auto (latest complete checkpoint, if any) | none | path to a step_* folder
    seed: int = 0
    picture_every: int = 0  # mask overlay of the current batch every N steps (0: first step only)
    export: bool = True  # write export/ at the end (when mimkit.checkpoint.export is installed)


@dataclass
class BeitConfig:
    """BEiT / PeCo / BEiT v2: predict a frozen tokenizer's ids at block-masked patches."""

    tokenizer: str = ""  # a tokenizer export folder (model.safetensors + mimkit.json)
    num_masked: int = 75  # patches masked per image (75 of 196 in the paper)
    min_block: int = 16  # smallest block, in patches
    max_block: Optional[int] = None  # None: up to the remaining count
    min_aspect: float = 0.3
    early_layer: int = 9  # beitv2: the head reads the patch states after this block (1-based)
    head_depth: int = 2  # beitv2: blocks of the CLS head
    head_loss_weight: float = 1.0  # beitv2: weight of the CLS-head CE term
    tokenizer_precision: str = "fp32"  # the frozen tokenizer's own dtype (fp32 | bf16)


@dataclass
class DebugConfig:
    """Fault injection for tests: a NaN loss, or a rank killed mid-run."""

    nan_at_step: int = -1  # make the loss NaN at this step...
    nan_rank: int = -1  # ...on this rank (-1: every rank)
    kill_at_step: int = -1  # SIGKILL this process at this step (before its forward)...
    kill_rank: int = 1  # ...on this rank


@dataclass
class PretrainConfig:
    objective: str = "beit"  # beit | peco | beitv2 | milan | mae | eva (objectives.py)
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ViTConfig = field(default_factory=ViTConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    beit: BeitConfig = field(default_factory=BeitConfig)
    milan: MilanConfig = field(default_factory=MilanConfig)
    mae: MaeConfig = field(default_factory=MaeConfig)
    eva: EvaConfig = field(default_factory=EvaConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
