"""Parameter groups (weight decay, layer-wise lr decay) and per-step warmup + cosine (or poly, or step) schedules.

A stream has no length, so every schedule is a function of the optimizer step. Each parameter group
carries ``lr_scale`` (layer-wise decay) and ``wd_scale`` (1 where weight decay applies, 0 where it
never does); :func:`apply_schedule` writes ``lr * lr_scale`` and ``wd * wd_scale`` into the groups of
whatever optimizer holds them (torch's, or DeepSpeed's ZeRO wrapper, which exposes the same groups).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch.nn as nn

# Name components that never get weight decay (BEiT / MAE / timm conventions): position tables,
# special tokens, relative-position tables, LayerScale gammas. Biases and norms are caught by ndim <= 1.
NO_DECAY_NAMES: tuple[str, ...] = (
    "pos_embed", "cls_token", "mask_token", "dist_token", "reg_token",
    "relative_position_bias_table", "gamma", "gamma_1", "gamma_2",
)

# Parameters of the embedding stem: layer 0 under layer-wise decay.
STEM_NAMES: tuple[str, ...] = ("patch_embed", "cls_token", "mask_token", "pos_embed", "reg_token")

_BLOCK_INDEX = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


@dataclass
class OptimConfig:
    """AdamW and its schedules. ``lr`` is per ``base_batch_size`` samples when that is set (> 0)."""

    lr: float = 1.5e-3  # peak learning rate (after warmup), per base_batch_size samples when that is set
    base_batch_size: int = 0  # 0: lr is used as given; N: lr = lr * global_batch / N (logged)
    min_lr: float = 1e-5  # where the cosine schedule ends
    warmup_steps: int = 0  # linear warmup from 0 to lr
    weight_decay: float = 0.05  # AdamW decoupled decay (not on biases, norms, position tables, tokens, gammas)
    weight_decay_end: float | None = None  # None: constant weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    eps: float = 1e-8  # AdamW
    layer_decay: float | None = None  # None or 1.0: no layer-wise decay


def resolve_lr(lr: float, global_batch: int, base_batch_size: int = 0) -> float:
    """The linear batch-size rule, applied only when the config asks for it (``base_batch_size > 0``)."""
    if base_batch_size and base_batch_size > 0:
        return lr * global_batch / base_batch_size
    return lr


def layer_id(name: str, num_layers: int) -> int:
    """Layer index for layer-wise decay: stem = 0, ``blocks.i`` = i + 1, everything else (head,
    final norm, a shared rel-pos table as in BEiT's reference) = num_layers + 1."""
    parts = name.split(".")
    if any(p in STEM_NAMES for p in parts):
        return 0
    match = _BLOCK_INDEX.search(name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


def is_no_decay(name: str, param: nn.Parameter, no_decay_names: Iterable[str] = NO_DECAY_NAMES) -> bool:
    """Biases, norm weights (all 1-d), and the named tables / tokens / gammas."""
    if param.ndim <= 1 or name.endswith(".bias"):
        return True
    parts = set(name.split("."))
    return any(n in parts for n in no_decay_names)


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None,
                 num_layers: int | None = None,
                 no_decay_names: Sequence[str] = NO_DECAY_NAMES) -> list[dict]:
    """Groups keyed by (decay or not, layer), each with ``weight_decay``, ``lr_scale``, ``wd_scale``
    and a readable ``name``. Frozen parameters are left out. With ``layer_decay`` the scale of layer i
    is ``layer_decay ** (num_layers + 1 - i)``."""
    use_layers = layer_decay is not None and layer_decay != 1.0
    if use_layers and num_layers is None:
        raise ValueError("layer_decay needs num_layers (the encoder depth)")
    groups: dict[tuple[bool, int], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not is_no_decay(name, param, no_decay_names)
        layer = layer_id(name, num_layers) if use_layers else 0
        key = (decay, layer)
        if key not in groups:
            scale = layer_decay ** (num_layers + 1 - layer) if use_layers else 1.0
            groups[key] = {
                "name": f"{'decay' if decay else 'no_decay'}" + (f"_layer{layer}" if use_layers else ""),
                "params": [], "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale, "wd_scale": 1.0 if decay else 0.0,
            }
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[1], not k[0]))]


def cosine_schedule(step: int, base: float, warmup_steps: int, total_steps: int, final: float) -> float:
    """Linear warmup to ``base`` (reached at step ``warmup_steps - 1``, so no step runs at 0), then
    half a cosine from ``base`` down to ``final`` at ``total_steps``; ``final`` after that."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * t))


def poly_schedule(step: int, base: float, warmup_steps: int, total_steps: int, final: float,
                  power: float = 1.0) -> float:
    """Linear warmup as :func:`cosine_schedule`, then ``(base - final) * (1 - t) ** power + final`` over
    the steps after warmup (mmsegmentation's PolyLR, per iteration)."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return final + (base - final) * (1.0 - t) ** power


def step_schedule(step: int, base: float, warmup_steps: int, total_steps: int, final: float,
                  milestones: Sequence[float] = (0.889, 0.963), gamma: float = 0.1) -> float:
    """Linear warmup as :func:`cosine_schedule`, then ``base`` times ``gamma`` for every milestone passed
    (fractions of ``total_steps``; ViTDet's COCO recipe: x0.1 at 88.9 % and 96.3 %), never below ``final``."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    passed = sum(step >= round(m * total_steps) for m in milestones)
    return max(final, base * gamma**passed)


def apply_schedule(optimizer, lr: float, weight_decay: float | None = None) -> None:
    """Write this step's lr (times each group's ``lr_scale``) and weight decay (times ``wd_scale``)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if weight_decay is not None:
            group["weight_decay"] = weight_decay * group.get("wd_scale", 1.0)


@dataclass
class Schedule:
    """lr and weight decay for a step, from an :class:`OptimConfig` with a resolved peak lr."""

    lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    weight_decay: float
    weight_decay_end: float | None = None

    @classmethod
    def from_config(cls, cfg: OptimConfig, total_steps: int, global_batch: int) -> "Schedule":
        return cls(resolve_lr(cfg.lr, global_batch, cfg.base_batch_size), cfg.min_lr, cfg.warmup_steps,
                   total_steps, cfg.weight_decay, cfg.weight_decay_end)

    def lr_at(self, step: int) -> float:
        return cosine_schedule(step, self.lr, self.warmup_steps, self.total_steps, self.min_lr)

    def weight_decay_at(self, step: int) -> float:
        if self.weight_decay_end is None:
            return self.weight_decay
        # weight decay has no warmup (BEiT v2 / DINO): cosine over the whole run
        return cosine_schedule(step, self.weight_decay, 0, self.total_steps, self.weight_decay_end)
