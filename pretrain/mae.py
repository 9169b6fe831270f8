"""MAE (arXiv 2111.06377): uniform random masking (75%), the encoder sees the visible patches only,
the MAE decoder (mask tokens scattered in, every token attends to every token), mean squared error
on the masked patches of the image's own pixels, each patch normalised by its mean and variance.

No teacher and no tokenizer: the targets are the image itself. The parts are in parts.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from mimkit.pretrain.objective import Method
from mimkit.pretrain.parts import RegressionConfig, masked_regression


@dataclass
class MaeConfig(RegressionConfig):
    mask_source: str = "random"
    mask_ratio: float = 0.75
    target: str = "pixels"
    norm_pix: bool = True
    decoder: str = "mae"
    loss: str = "mse"
    loss_on: str = "masked"


MAE = Method(MaeConfig, masked_regression)
