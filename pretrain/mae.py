"""MAE (arXiv 2111.06377) from MILAN's parts: uniform random masking (75%), normalised-pixel targets,
the MAE decoder (all tokens attend to each other), mean squared error on the masked patches.

No teacher: the targets are the image's own patches, each normalised by its mean and variance.
The composition and the loop over a batch live in pretrain/milan.py (`MaskedRegressionModel`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mimkit.pretrain.milan import MaskedRegressionConfig, build_encoder, build_parts


@dataclass
class MaeConfig(MaskedRegressionConfig):
    mask_source: str = "random"
    target: str = "pixels"
    norm_pix: bool = True
    decoder: str = "mae"
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    loss: str = "mse"
    loss_on: str = "masked"


def build(cfg):
    """The objective table's entry for `mae`: (model, targets) from a PretrainConfig."""
    return build_parts(cfg.mae, build_encoder(cfg), cfg.data.mean, cfg.data.std)
