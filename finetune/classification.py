"""Classifiers on the one ViT: full fine-tuning (pooled tokens -> LayerNorm -> linear) and the linear probe
(frozen encoder, BatchNorm without affine -> linear, the MAE protocol). Weights come from a mimkit export
or any layout `mimkit.checkpoint.load` reads."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from mimkit.checkpoint.export_format import read_export_meta, vit_config_from_export
from mimkit.checkpoint.load import LoadReport, load_checkpoint_into_vit
from mimkit.finetune.config import FinetuneConfig
from mimkit.models.vit import ViTConfig, VisionTransformer, preset


def export_meta(init: str) -> Optional[dict]:
    """The mimkit.json beside an export (folder or its model.safetensors), or None for foreign files."""
    if not init:
        return None
    path = Path(init)
    try:
        return read_export_meta(path if path.is_dir() else path.parent)
    except FileNotFoundError:
        return None


def encoder_config(cfg: FinetuneConfig, meta: Optional[dict]) -> ViTConfig:
    """The export's architecture (or the preset's) with the fine-tuning head options."""
    if meta is not None:
        vit = vit_config_from_export(meta)
    else:
        vit = preset(cfg.model.preset)
    changes = dict(num_classes=0, global_pool=cfg.model.global_pool, drop_path=cfg.model.drop_path,
                   mask_token=False, fc_norm=None)
    if cfg.model.img_size:
        changes["img_size"] = cfg.model.img_size
    if cfg.model.rel_pos:
        changes["rel_pos"] = cfg.model.rel_pos
    if cfg.mode == "linprobe":
        changes["drop_path"] = 0.0
    return dataclasses.replace(vit, **changes)


class LinearProbe(nn.Module):
    """A frozen encoder (always in eval mode) and BatchNorm1d(affine=False) + Linear on its pooled features."""

    def __init__(self, encoder: VisionTransformer, num_classes: int):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.head = nn.Sequential(nn.BatchNorm1d(encoder.embed_dim, affine=False, eps=1e-6),
                                  nn.Linear(encoder.embed_dim, num_classes))
        trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.encoder.eval()  # no drop path, and the encoder's state never moves
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.encoder.forward_head(self.encoder.forward_features(images), pre_logits=True)  # [B, D]
        return self.head(feats.float())


def build_classifier(cfg: FinetuneConfig) -> tuple[nn.Module, Optional[LoadReport], Optional[dict]]:
    """(model, load report or None for scratch, export metadata or None)."""
    meta = export_meta(cfg.model.init)
    vit_cfg = encoder_config(cfg, meta)
    encoder = VisionTransformer(vit_cfg)
    report = load_checkpoint_into_vit(encoder, cfg.model.init, verbose=False) if cfg.model.init else None
    if cfg.mode == "linprobe":
        return LinearProbe(encoder, cfg.data.num_classes), report, meta
    encoder.reset_classifier(cfg.data.num_classes)
    with torch.no_grad():  # a small fresh head keeps early gradients from wrecking the pretrained encoder
        encoder.head.weight.mul_(cfg.model.head_init_scale)
    return encoder, report, meta
