"""BEiT, PeCo and BEiT v2: predict a frozen tokenizer's ids at block-masked patches.

A batch goes, in order:

1. The data stream gives two views of one crop, `image` for the ViT and `image_tok` at the
   tokenizer's size and normalisation (the Objective's `second_view`, read from the tokenizer export),
   and a block mask per image (`BlockMasks`, drawn in the data workers, seeded per batch).
2. `TokenizerTargets` (under no-grad, outside the engine): the frozen tokenizer turns `image_tok` into
   ids [B, N], one per patch.
3. `MaskedTokenPrediction` (the trainable model, inside the engine): the ViT encodes all patches with
   the masked ones replaced by the mask token; a linear head predicts the ids at masked positions;
   cross-entropy. BEiT v2 (`MaskedTokenPredictionV2`) adds a 2-block head that sees the final CLS
   token with an early layer's patch states, so the CLS token must summarise the image; its CE term
   is added to the loss and logged apart.

BEiT and PeCo differ only in the tokenizer export (DALL-E dVAE vs perceptual VQ codebook).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimkit.data.masking import BlockMasks
from mimkit.errors import BadValue
from mimkit.data.transforms import SecondView
from mimkit.checkpoint.tokenizer_export import load_tokenizer
from mimkit.models.vit import Block, VisionTransformer
from mimkit.pretrain.objective import Method, Objective
from mimkit.pretrain.parts import TokenizerTargets
from mimkit.teachers.base import frozen_precision, teacher_dtype


@dataclass
class BeitConfig:
    """BEiT / PeCo: the `method:` section."""

    tokenizer: str = ""  # a tokenizer export folder (model.safetensors + mimkit.json)
    num_masked: int = 75  # patches masked per image (75 of 196 in the paper)
    min_block: int = 16  # smallest block, in patches
    max_block: Optional[int] = None  # None: up to the remaining count
    min_aspect: float = 0.3
    tokenizer_precision: str = "auto"  # the frozen tokenizer's own dtype: auto (bf16 when the model trains in bf16/fp16, else fp32) | fp32 | bf16


@dataclass
class BeitV2Config(BeitConfig):
    """BEiT v2: BEiT's section plus the CLS head."""

    early_layer: int = 9  # the head reads the patch states after this block (1-based)
    head_depth: int = 2  # blocks of the CLS head
    head_loss_weight: float = 1.0  # weight of the CLS-head CE term


# ---- the trainable model --------------------------------------------------------------------------


def masked_ce(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and accuracy over the masked positions: logits [M, V], ids [M]."""
    loss = F.cross_entropy(logits.float(), ids)
    acc = (logits.argmax(-1) == ids).float().mean()
    return loss, acc


class MaskedTokenPrediction(nn.Module):
    """BEiT / PeCo: the encoder (mask-token mode) and a linear head over the vocabulary."""

    def __init__(self, encoder: VisionTransformer, vocab_size: int):
        super().__init__()
        if encoder.mask_token is None:
            raise ValueError("BEiT needs an encoder with a mask token (model.mask_token=true)")
        self.encoder = encoder
        self.lm_head = nn.Linear(encoder.embed_dim, vocab_size)
        nn.init.trunc_normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)

    def forward(self, batch: dict) -> dict:
        mask = batch["mask"]  # [B, N] bool, True = masked
        tokens = self.encoder.forward_features(batch["image"], mask=mask)  # [B, P + N, D]
        patches = tokens[:, self.encoder.num_prefix_tokens:]  # [B, N, D]
        loss, acc = masked_ce(self.lm_head(patches[mask]), batch["ids"][mask])  # [M, V] vs [M]
        return {"loss": loss, "mlm_acc": acc}


class MaskedTokenPredictionV2(MaskedTokenPrediction):
    """BEiT v2: the same, plus a CLS head: `head_depth` blocks over [final CLS; patch states after block
    `early_layer`], normed and decoded by the shared lm head; loss = CE(final) + w * CE(CLS head)."""

    def __init__(self, encoder: VisionTransformer, vocab_size: int, early_layer: int = 9, head_depth: int = 2,
                 head_loss_weight: float = 1.0):
        super().__init__(encoder, vocab_size)
        depth = len(encoder.blocks)
        if not 1 <= early_layer <= depth:
            raise ValueError(f"method.early_layer={early_layer} must be in 1..{depth} (the encoder depth)")
        if encoder.num_prefix_tokens != 1:
            raise ValueError("BEiT v2 needs a CLS token (model.class_token=true)")
        self.early_layer = early_layer
        self.head_loss_weight = head_loss_weight
        head_cfg = copy.deepcopy(encoder.cfg)
        head_cfg.rescale_init = False
        self.cls_pt_layers = nn.ModuleList(Block(head_cfg, 0.0, encoder.grid_size, 0) for _ in range(head_depth))
        for m in self.cls_pt_layers.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, batch: dict) -> dict:
        mask, ids = batch["mask"], batch["ids"]
        enc = self.encoder
        final, (early,) = enc.forward_intermediates(batch["image"], [self.early_layer - 1], mask=mask)
        loss_final, acc = masked_ce(self.lm_head(final[:, 1:][mask]), ids[mask])
        x = torch.cat([final[:, :1], early[:, 1:]], dim=1)  # [B, 1 + N, D]: final CLS, early patches
        shared = enc.rel_pos_bias(None, True) if enc.rel_pos_bias is not None else None
        for blk in self.cls_pt_layers:
            x = blk(x, shared, None, True)
        x = enc.norm(x)
        loss_head, acc_head = masked_ce(self.lm_head(x[:, 1:][mask]), ids[mask])
        return {"loss": loss_final + self.head_loss_weight * loss_head, "loss_mim": loss_final,
                "loss_cls_head": loss_head, "mlm_acc": acc, "mlm_acc_cls_head": acc_head}


# ---- build ----------------------------------------------------------------------------------------


def _mask_overlay(pixel_mean, pixel_std, patch_size: int):
    def picture(model: nn.Module, batch: dict, path: Path) -> None:
        """The ViT view with its masked patches greyed out."""
        from mimkit.pictures import denormalize, save_mask_overlay

        images = denormalize(batch["image"].float().cpu(), pixel_mean, pixel_std)
        save_mask_overlay(images, batch["mask"].cpu(), patch_size, path)

    return picture


def build(cfg, m: BeitConfig) -> Objective:
    """`beit`, `peco` and (with a BeitV2Config) `beitv2`: the Objective from a PretrainConfig."""
    if not m.tokenizer:
        raise BadValue("method.tokenizer is not set: give a tokenizer export folder "
                         "(method.tokenizer=runs/tok/export)")
    if m.tokenizer_precision not in ("auto", "fp32", "bf16"):
        raise BadValue(f"method.tokenizer_precision={m.tokenizer_precision!r}: expected auto, fp32 or bf16")
    precision = frozen_precision(m.tokenizer_precision, cfg.engine.precision)
    tokenizer = load_tokenizer(m.tokenizer, key="method.tokenizer").to(dtype=teacher_dtype(precision))
    encoder = VisionTransformer(copy.deepcopy(cfg.model))
    grid = tuple(encoder.grid_size)
    if tuple(tokenizer.grid) != grid:
        raise BadValue(f"method.tokenizer={m.tokenizer}: its grid {tuple(tokenizer.grid)} != the ViT's patch grid "
                       f"{grid}: every patch needs one target id (match model.img_size / patch_size to its input)")
    h, w = tokenizer.input_size
    if h != w:
        raise ValueError(f"square tokenizer inputs only, got {tokenizer.input_size}")
    if isinstance(m, BeitV2Config):
        model = MaskedTokenPredictionV2(encoder, tokenizer.vocab_size, m.early_layer, m.head_depth, m.head_loss_weight)
    else:
        model = MaskedTokenPrediction(encoder, tokenizer.vocab_size)
    targets = TokenizerTargets(tokenizer, str(Path(m.tokenizer).expanduser().resolve()))
    # The tokenizer view must be what the tokenizer was trained on.
    view = SecondView(h, tokenizer.interpolation, tuple(tokenizer.mean), tuple(tokenizer.std))
    return Objective(model=model, targets=targets,
                     masks=BlockMasks(grid, m.num_masked, m.min_block, m.max_block, m.min_aspect),
                     second_view=view, picture=_mask_overlay(cfg.data.mean, cfg.data.std, encoder.patch_embed.patch_size[0]),
                     export_meta=targets.describe())


BEIT = Method(BeitConfig, build)
BEITV2 = Method(BeitV2Config, build)
