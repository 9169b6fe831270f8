"""Name maps between mimkit's ViT and the BEiT family's layout (official BEiT / BEiT v2 and timm's Beit).

mimkit names are timm VisionTransformer names, so timm ViT needs no map. The BEiT family differs
only in LayerScale names (gamma_1 / gamma_2 vs ls1.gamma / ls2.gamma) and, in official checkpoints,
saved relative_position_index buffers (recomputed here, never loaded).
"""

from __future__ import annotations

import re
from typing import Dict

import torch

_OURS_GAMMA = re.compile(r"^(blocks\.\d+)\.ls([12])\.gamma$")
_BEIT_GAMMA = re.compile(r"^(blocks\.\d+)\.gamma_([12])$")


def to_timm_beit_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """mimkit BEiT-style state dict -> keys of timm's `Beit` (gamma_1 / gamma_2; no mask token,
    which timm's Beit does not hold)."""
    out = {}
    for name, value in state.items():
        if name == "mask_token":
            continue
        out[_OURS_GAMMA.sub(r"\1.gamma_\2", name)] = value
    return out


def from_beit_names(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official BEiT / BEiT v2 / timm Beit keys -> mimkit keys (index buffers dropped: recomputed)."""
    return {_BEIT_GAMMA.sub(r"\1.ls\2.gamma", name): value for name, value in state.items()
            if not name.endswith("relative_position_index")}
