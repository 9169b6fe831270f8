"""The typed config of ``deepspeed tokenizers --config configs/tokenizers/NAME.yaml [key=value ...]``.

The ``data`` section is the shared stream config; its ``image_size``, ``interpolation``, ``mean`` and
``std`` are the tokenizer's input contract and go into the export unchanged (a tokenizer sees one view).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mimkit.data.stream import DataConfig
from mimkit.distributed.engine import EngineConfig
from mimkit.distributed.loop import FaultConfig
from mimkit.models.dvae import DVAEConfig
from mimkit.models.vqgan import VQGANConfig
from mimkit.models.vqkd import VQKDConfig
from mimkit.optim import OptimConfig
from mimkit.teachers import TeacherConfig

KINDS = ("dvae", "peco", "vqkd")


@dataclass
class RunConfig:
    name: str = "tokenizer"
    root: str = "runs"
    seed: int = 0
    steps: int = 1000  # optimizer steps
    log_every: int = 10
    usage_every: int = 100  # codebook usage / perplexity window (also logged at the end)
    picture_every: int = 500  # reconstructions of a fixed batch (0: only at the end)
    picture_count: int = 8  # images of the fixed batch shown
    save_every: int = 0  # engine checkpoints every N steps (0: none)
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto (latest verified, else the newest that verifies) | strict (latest or stop) | none | a checkpoint folder


@dataclass
class PerceptualConfig:
    """PeCo's perceptual loss: feature distances at ``layers`` (0-based block indices) of a frozen teacher's
    tower (kind open_clip: an open_clip vision tower; vit_export: a mimkit ViT export)."""

    weight: float = 1.0
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    layers: list[int] = field(default_factory=lambda: [2, 5, 8, 11])


@dataclass
class AdversarialConfig:
    """Optional PatchGAN hinge term (off by default: the usual source of instability)."""

    enabled: bool = False
    weight: float = 0.1
    start_step: int = 0  # the generator term joins from this step (the discriminator trains throughout)
    channels: int = 64
    layers: int = 3


@dataclass
class ExportConfig:
    include_decoder: bool = False  # BEiT targets need only the encoder and codebook


@dataclass
class TokenizerTrainConfig:
    kind: str = "dvae"  # dvae | peco | vqkd
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(
        image_size=112, interpolation="lanczos", color_jitter=0.0,
        mean=[-0.125] * 3, std=[1.25] * 3))
    engine: EngineConfig = field(default_factory=EngineConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0, min_lr=1e-5))
    dvae: DVAEConfig = field(default_factory=DVAEConfig)
    peco: VQGANConfig = field(default_factory=VQGANConfig)
    vqkd: VQKDConfig = field(default_factory=VQKDConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # VQ-KD's target network
    export: ExportConfig = field(default_factory=ExportConfig)
    debug: FaultConfig = field(default_factory=FaultConfig)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}: expected one of {KINDS}")
        # the teacher this kind builds, checked before any work starts
        if self.kind == "vqkd":
            self.teacher.check("teacher")
        if self.kind == "peco" and self.perceptual.weight > 0:
            self.perceptual.teacher.check("perceptual.teacher")

    @property
    def arch(self):
        """The chosen tokenizer's architecture config."""
        return getattr(self, self.kind)
