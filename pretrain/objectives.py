"""The objective table: `objective` name -> `build(cfg) -> (model, targets)`.

`model` is the trainable module that goes into the engine (`model(batch, targets) -> {"loss", ...}`);
`targets` is a callable `batch -> dict` holding the frozen tokenizer or teacher, called under no-grad
outside the engine. See ARCHITECTURE.md, "Stages".
"""

from __future__ import annotations

from typing import Callable

from mimkit.pretrain import beit, eva, mae, milan

OBJECTIVES: dict[str, Callable] = {
    "beit": beit.build,  # DALL-E dVAE tokens
    "peco": beit.build,  # the same, perceptual-codebook tokens (another tokenizer export)
    "beitv2": beit.build_v2,  # VQ-KD tokens + CLS head on an early layer
    "milan": milan.build,  # CLIP features, guided masking, prompting decoder
    "mae": mae.build,  # normalised pixels
    "eva": eva.build,  # CLIP features at masked positions
}


def build_objective(cfg):
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {cfg.objective!r}; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[cfg.objective](cfg)
