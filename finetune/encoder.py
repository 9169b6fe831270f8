"""The fine-tuning encoder of every task: the one ViT, built from an export's architecture (or a preset)
with the fine-tuning options, its weights from the export or any layout `mimkit.checkpoint.load` reads
(position tables resized to the run's input size)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

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


def build_encoder(cfg: FinetuneConfig, adapt: Optional[Callable[[ViTConfig], ViTConfig]] = None
                  ) -> tuple[VisionTransformer, Optional[LoadReport], Optional[dict]]:
    """(encoder with the init's weights, load report or None for scratch, export metadata or None).
    `adapt`: a task's own changes to the architecture before it is built (ViTDet: windows, no class token)."""
    meta = export_meta(cfg.model.init)
    vit_cfg = encoder_config(cfg, meta)
    encoder = VisionTransformer(adapt(vit_cfg) if adapt else vit_cfg)
    report = load_checkpoint_into_vit(encoder, cfg.model.init, verbose=False) if cfg.model.init else None
    return encoder, report, meta
