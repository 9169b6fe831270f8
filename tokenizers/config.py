"""The typed config of ``deepspeed tokenizers --config configs/tokenizers/NAME.yaml [key=value ...]``.

The ``data`` section is the shared stream config; its ``image_size``, ``interpolation``, ``mean`` and
``std`` are the tokenizer's input contract and go into the export unchanged (``tok_size`` is unused:
a tokenizer sees one view).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mimkit.data.stream import DataConfig
from mimkit.distributed.engine import EngineConfig
from mimkit.models.dvae import DVAEConfig
from mimkit.models.vqgan import VQGANConfig
from mimkit.models.vqkd import VQKDConfig
from mimkit.optim import OptimConfig

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
    resume: str = "auto"  # auto (latest in the run folder, if any) | none | a checkpoint folder


@dataclass
class DebugConfig:
    """Fault injection for tests."""

    signal_at_step: int = -1  # send SIGUSR1 to this process after this step, as Slurm's warning does...
    signal_rank: int = 0  # ...on this rank


@dataclass
class OpenClipConfig:
    """A frozen open_clip vision tower, created by name; weights from a local file or a cached tag."""

    model_name: str = "ViT-B-16"
    pretrained: Optional[str] = None  # a file path, or an open_clip tag already in the cache; None: random
    model_cfg: Optional[str] = None  # an open_clip model-config JSON file: random weights (tests, tiny presets)
    precision: str = "fp32"
    cache_dir: Optional[str] = None


@dataclass
class PerceptualConfig:
    """PeCo's perceptual loss: feature distances at ``layers`` (0-based block indices) of a frozen net."""

    weight: float = 1.0
    network: str = "open_clip"  # open_clip | vit_export
    open_clip: OpenClipConfig = field(default_factory=OpenClipConfig)
    vit_export: Optional[str] = None  # a mimkit ViT export folder (model.safetensors + mimkit.json)
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
        image_size=112, tok_size=None, interpolation="lanczos", color_jitter=0.0,
        mean=[-0.125] * 3, std=[1.25] * 3))
    engine: EngineConfig = field(default_factory=EngineConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0, min_lr=1e-5))
    dvae: DVAEConfig = field(default_factory=DVAEConfig)
    peco: VQGANConfig = field(default_factory=VQGANConfig)
    vqkd: VQKDConfig = field(default_factory=VQKDConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    teacher: OpenClipConfig = field(default_factory=OpenClipConfig)  # VQ-KD's target network
    export: ExportConfig = field(default_factory=ExportConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}: expected one of {KINDS}")
        if self.perceptual.network not in ("open_clip", "vit_export"):
            raise ValueError(f"perceptual.network={self.perceptual.network!r}: open_clip or vit_export")

    @property
    def arch(self):
        """The chosen tokenizer's architecture config."""
        return getattr(self, self.kind)
