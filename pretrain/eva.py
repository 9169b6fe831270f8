"""EVA-style CLIP-feature regression (arXiv 2211.07636) from MILAN's parts: BEiT block masking (40%),
the encoder sees every position (masked patches replaced by its mask token), a linear head maps each
token to the CLIP teacher's feature size, negative cosine similarity on the masked tokens.

The teacher is the same frozen open_clip tower as MILAN's (`mimkit.teachers.clip`); the
composition and the loop over a batch live in pretrain/milan.py (`MaskedRegressionModel`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mimkit.pretrain.milan import MaskedRegressionConfig, build_encoder, build_parts


@dataclass
class EvaConfig(MaskedRegressionConfig):
    mask_source: str = "block"
    mask_ratio: float = 0.4
    target: str = "clip"
    decoder: str = "linear"
    loss: str = "neg_cosine"
    loss_on: str = "masked"


def build(cfg):
    """The objective table's entry for `eva`: (model, targets) from a PretrainConfig."""
    return build_parts(cfg.eva, build_encoder(cfg), cfg.data.mean, cfg.data.std)
