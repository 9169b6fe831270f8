"""BEiT, PeCo and BEiT v2: predict a frozen tokenizer's ids at block-masked patches.

A batch goes, in order:

1. The data stream draws a block mask per image (`BlockMaskGenerator`, reseeded per batch so a resumed
   run draws the same masks) and gives two views of one crop: `image` for the ViT, `image_tok` at the
   tokenizer's size and normalisation (read from the tokenizer export).
2. `TokenTargets` (under no-grad, outside the engine): the frozen tokenizer turns `image_tok` into ids
   [B, N], one per patch.
3. `MaskedTokenPrediction` (the trainable model, inside the engine): the ViT encodes all patches with
   the masked ones replaced by the mask token; a linear head predicts the ids at masked positions;
   cross-entropy. BEiT v2 (`MaskedTokenPredictionV2`) adds a 2-block head that sees the final CLS
   token with an early layer's patch states, so the CLS token must summarise the image; its CE term
   is added to the loss and logged apart.

BEiT and PeCo differ only in the tokenizer export (DALL-E dVAE vs perceptual VQ codebook).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimkit.data.masking import BlockMaskGenerator
from mimkit.checkpoint.tokenizer_export import Tokenizer, load_tokenizer
from mimkit.models.vit import Block, VisionTransformer

# ---- targets: the frozen tokenizer ----------------------------------------------------------------


class TokenTargets:
    """`batch -> {"ids": [B, N] long}` from the tokenizer view; also the stream's mask source and the
    tokenizer view's settings, so the data pipeline follows the export."""

    def __init__(self, tokenizer: Tokenizer, grid: tuple[int, int], mask_fn: BlockMaskGenerator,
                 patch_size: int, pixel_mean, pixel_std):
        self.tokenizer = tokenizer
        self.grid = tuple(grid)
        self.mask_fn = mask_fn
        self.patch_size = patch_size
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)
        if tuple(tokenizer.grid) != self.grid:
            raise ValueError(f"tokenizer grid {tuple(tokenizer.grid)} != ViT patch grid {self.grid}: every patch "
                             "needs one target id (match model.img_size / patch_size to the tokenizer's input)")
        if mask_fn.num_masked >= grid[0] * grid[1]:
            raise ValueError(f"beit.num_masked={mask_fn.num_masked} leaves no visible patch of {grid[0] * grid[1]}")

    def data_overrides(self) -> dict:
        """The tokenizer view must be what the tokenizer was trained on."""
        h, w = self.tokenizer.input_size
        if h != w:
            raise ValueError(f"square tokenizer inputs only, got {self.tokenizer.input_size}")
        return {"tok_size": h, "tok_interpolation": self.tokenizer.interpolation,
                "tok_mean": list(self.tokenizer.mean), "tok_std": list(self.tokenizer.std)}

    def to(self, device) -> "TokenTargets":
        self.tokenizer.to(device)
        return self

    def state_dict(self) -> dict:
        return {}  # masks are reseeded per batch by the stream; the tokenizer is frozen

    def load_state_dict(self, state: dict) -> None:
        pass

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        ids = self.tokenizer.tokenize(batch["image_tok"])  # [B, h, w]
        return {"ids": ids.flatten(1)}  # [B, N], row-major like the patch sequence

    def picture(self, model: nn.Module, batch: dict, targets: dict, path) -> Path:
        """The ViT view with its masked patches greyed out (rank 0 only)."""
        from mimkit.pictures import denormalize, save_mask_overlay

        images = denormalize(batch["image"].float().cpu(), self.pixel_mean, self.pixel_std)
        return save_mask_overlay(images, batch["mask"].cpu(), self.patch_size, path)


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

    def forward(self, batch: dict, targets: dict) -> dict:
        mask = batch["mask"]  # [B, N] bool, True = masked
        tokens = self.encoder.forward_features(batch["image"], mask=mask)  # [B, P + N, D]
        patches = tokens[:, self.encoder.num_prefix_tokens:]  # [B, N, D]
        loss, acc = masked_ce(self.lm_head(patches[mask]), targets["ids"][mask])  # [M, V] vs [M]
        return {"loss": loss, "mlm_acc": acc}


class MaskedTokenPredictionV2(MaskedTokenPrediction):
    """BEiT v2: the same, plus a CLS head: `head_depth` blocks over [final CLS; patch states after block
    `early_layer`], normed and decoded by the shared lm head; loss = CE(final) + w * CE(CLS head)."""

    def __init__(self, encoder: VisionTransformer, vocab_size: int, early_layer: int = 9, head_depth: int = 2,
                 head_loss_weight: float = 1.0):
        super().__init__(encoder, vocab_size)
        depth = len(encoder.blocks)
        if not 1 <= early_layer <= depth:
            raise ValueError(f"beit.early_layer={early_layer} must be in 1..{depth} (the encoder depth)")
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

    def forward(self, batch: dict, targets: dict) -> dict:
        mask, ids = batch["mask"], targets["ids"]
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


def _parts(cfg) -> tuple[VisionTransformer, Tokenizer, TokenTargets]:
    if not cfg.beit.tokenizer:
        raise ValueError("beit.tokenizer is not set: give a tokenizer export folder (beit.tokenizer=runs/tok/export)")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.beit.tokenizer_precision]
    tokenizer = load_tokenizer(cfg.beit.tokenizer).to(dtype=dtype)
    encoder = VisionTransformer(copy.deepcopy(cfg.model))
    b = cfg.beit
    mask_fn = BlockMaskGenerator(encoder.grid_size, b.num_masked, b.min_block, b.max_block, b.min_aspect,
                                 seed=cfg.run.seed)
    targets = TokenTargets(tokenizer, encoder.grid_size, mask_fn, encoder.patch_embed.patch_size[0],
                           cfg.data.mean, cfg.data.std)
    return encoder, tokenizer, targets


def build(cfg):
    """`beit` and `peco`: (model, targets) from a PretrainConfig."""
    encoder, tokenizer, targets = _parts(cfg)
    return MaskedTokenPrediction(encoder, tokenizer.vocab_size), targets


def build_v2(cfg):
    """`beitv2`: (model, targets) from a PretrainConfig."""
    encoder, tokenizer, targets = _parts(cfg)
    b = cfg.beit
    model = MaskedTokenPredictionV2(encoder, tokenizer.vocab_size, b.early_layer, b.head_depth, b.head_loss_weight)
    return model, targets
