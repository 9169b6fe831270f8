"""The fine-tuning encoder of every task: the one ViT, built from an export's architecture, or for a
foreign checkpoint from what its shapes tell (`mimkit.checkpoint.load.infer_architecture`) and the
`model.*` keys, else a preset, with the fine-tuning options; its weights from the export or any layout
`mimkit.checkpoint.load` reads (position tables resized to the run's input size)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

from mimkit.checkpoint.export_format import read_export_meta, vit_config_from_export
from mimkit.checkpoint.load import (ArchitectureMismatch, LoadReport, default_heads, infer_architecture, load_into_vit,
                                    load_state)
from mimkit.errors import BadValue, UserError
from mimkit.finetune.config import FinetuneConfig
from mimkit.models.vit import PRESETS, ViTConfig, VisionTransformer, preset


def export_meta(init: str) -> Optional[dict]:
    """The mimkit.json beside an export (folder or its model.safetensors), or None for foreign files."""
    if not init:
        return None
    path = Path(init)
    try:
        return read_export_meta(path if path.is_dir() else path.parent)
    except FileNotFoundError:
        return None


ARCH_KEYS = ("embed_dim", "depth", "patch_size", "num_heads")  # model.* keys that set the encoder's shape


def encoder_config(cfg: FinetuneConfig, meta: Optional[dict], inferred: Optional[tuple[dict, list]] = None) -> ViTConfig:
    """The export's architecture, else the preset's with what a foreign checkpoint's shapes tell (`inferred`:
    :func:`mimkit.checkpoint.load.infer_architecture`'s), then the `model.*` keys, then the fine-tuning head
    options. A key that contradicts the export or the checkpoint is refused, naming both."""
    if cfg.model.preset not in PRESETS:
        raise BadValue(f"model.preset={cfg.model.preset!r}: expected one of {sorted(PRESETS)}")
    base = preset(cfg.model.preset)
    told = dict(inferred[0]) if inferred is not None else {}
    vit = vit_config_from_export(meta) if meta is not None else dataclasses.replace(base, **told)
    where = "the export's mimkit.json" if meta is not None else f"the checkpoint (model.init={cfg.model.init})"
    keys = {k: getattr(cfg.model, k) for k in ARCH_KEYS if getattr(cfg.model, k) is not None}
    for k, value in keys.items():
        known = getattr(vit, k) if meta is not None else told.get(k)
        if known is not None and known != value:
            raise ArchitectureMismatch(f"model.{k}={value}: {where} has {k} {known}")
    vit = dataclasses.replace(vit, **keys)
    if inferred is not None and "num_heads" in inferred[1] and "num_heads" not in keys:
        heads = base.num_heads if base.embed_dim == vit.embed_dim else default_heads(vit.embed_dim)
        vit = dataclasses.replace(vit, num_heads=heads)
    if vit.embed_dim % vit.num_heads:
        raise BadValue(f"model.num_heads={vit.num_heads}: does not divide embed_dim {vit.embed_dim}")
    changes = dict(num_classes=0, global_pool=cfg.model.global_pool, drop_path=cfg.model.drop_path,
                   mask_token=False, fc_norm=None)
    if cfg.model.img_size:
        changes["img_size"] = cfg.model.img_size
    if cfg.model.rel_pos:
        changes["rel_pos"] = cfg.model.rel_pos
    if cfg.mode == "linprobe":
        changes["drop_path"] = 0.0
    return dataclasses.replace(vit, **changes)


def describe_inferred(vit: ViTConfig, inferred: tuple[dict, list], keys: set) -> str:
    """One line: what the checkpoint's shapes gave, and what was assumed (`keys`: the model.* keys set)."""
    told, unknown = inferred
    shown = ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "mlp_ratio", "pos_embed", "rel_pos",
             "qkv_bias", "class_token")
    text = "no mimkit.json: from its shapes " + ", ".join(f"{k} {told[k]:g}" if isinstance(told[k], float) else
                                                           f"{k} {told[k]}" for k in shown if k in told)
    if "num_heads" in unknown:
        text += (f"; num_heads {vit.num_heads} from model.num_heads" if "num_heads" in keys else
                 f"; num_heads {vit.num_heads} assumed (no per-head table: set model.num_heads)")
    return text + "; pixel normalisation from data.mean / data.std"


def build_encoder(cfg: FinetuneConfig, adapt: Optional[Callable[[ViTConfig], ViTConfig]] = None
                  ) -> tuple[VisionTransformer, Optional[LoadReport], Optional[dict]]:
    """(encoder with the init's weights, load report or None for scratch, export metadata or None).
    `adapt`: a task's own changes to the architecture before it is built (ViTDet: windows, no class token).
    A checkpoint without mimkit.json gives its architecture from its shapes (`report.architecture` says
    what was read and assumed)."""
    init = cfg.model.init
    try:
        meta = export_meta(init)
        state = load_state(init) if init else None
        inferred = infer_architecture(state) if state is not None and meta is None else None
        vit_cfg = encoder_config(cfg, meta, inferred)
        encoder = VisionTransformer(adapt(vit_cfg) if adapt else vit_cfg)
        report = load_into_vit(encoder, state, verbose=False) if state is not None else None
    except UserError as err:  # name the key the user wrote
        text = str(err)
        raise type(err)(text if text.startswith("model.") else f"model.init={init}: {text}") from None
    if inferred is not None:
        report.architecture = describe_inferred(vit_cfg, inferred, {k for k in ARCH_KEYS if getattr(cfg.model, k)})
    return encoder, report, meta
