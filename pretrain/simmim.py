"""SimMIM (arXiv 2111.09886): a simple framework for masked image modeling.

1. masks: uniform random masking of 60% of the image, in 32 px units (2 x 2 patches of a 16 px grid),
   drawn in the data workers;
2. encoder: the ViT sees every position, masked patches replaced by its learned mask token;
3. head: one linear layer per token to the raw pixels of its patch (SimMIM's 1x1 convolution followed
   by a pixel shuffle is the same map);
4. loss: L1 between predicted and true pixels (in the stream's normalisation, no per-patch
   normalisation), on the masked patches only.

No decoder, no teacher, no tokenizer: the paper's point is that this is enough. The parts are in
parts.py; the encoder needs `model.mask_token: true`.
"""

from __future__ import annotations

from dataclasses import dataclass

from mimkit.pretrain.objective import Method
from mimkit.pretrain.parts import RegressionConfig, masked_regression


@dataclass
class SimMIMConfig(RegressionConfig):
    mask_source: str = "random"
    mask_ratio: float = 0.6
    mask_unit: int = 2  # 32 px mask units on a 16 px patch grid
    target: str = "pixels"
    norm_pix: bool = False
    decoder: str = "linear"
    loss: str = "l1"
    loss_on: str = "masked"


SIMMIM = Method(SimMIMConfig, masked_regression)
