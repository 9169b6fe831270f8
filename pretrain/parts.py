"""The parts pretraining methods are composed of, in explicit tables (no registry): grep a name to find it.

- mask sources (`MASK_SOURCES`): which patches are hidden (`mimkit.data.masking`);
- targets (`TARGETS`): what the model predicts, computed frozen and outside the engine;
- decoders (`DECODERS`): from the encoder's tokens to one prediction per position;
- losses (`LOSSES`): per-token distances, averaged over all tokens or the masked ones.

`MaskedRegression` is the trainable model of every method that regresses targets at patch positions
(MILAN, MAE, EVA, SimMIM), and `masked_regression` composes one from a `RegressionConfig`: a method
file is then its defaults and a call (see milan.py). BEiT-style token prediction has its own model
(beit.py) but uses the same mask sources and the `TokenizerTargets` here.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimkit.data.masking import BlockMasks, GuidedMasks, MaskSource, RandomMasks
from mimkit.models.decoders import MAEDecoder, PromptingDecoder
from mimkit.checkpoint.tokenizer_export import Tokenizer
from mimkit.models.vit import VisionTransformer
from mimkit.pretrain.objective import Objective
from mimkit.teachers import Teacher, TeacherConfig, build_teacher

# ---- mask sources ---------------------------------------------------------------------------------

MASK_SOURCES: Dict[str, type] = {"block": BlockMasks, "random": RandomMasks, "guided": GuidedMasks}


def build_mask_source(name: str, grid: tuple[int, int], mask_ratio: float, block_min_patches: int = 16,
                      unit: int = 1) -> MaskSource:
    """`name` from MASK_SOURCES, hiding round(mask_ratio * N) patches (whole units for `random`)."""
    if name not in MASK_SOURCES:
        raise ValueError(f"method.mask_source={name!r}: expected one of {sorted(MASK_SOURCES)}")
    num_patches = grid[0] * grid[1]
    if name == "random":
        per_unit = unit * unit
        return RandomMasks(grid, int(round(num_patches * mask_ratio / per_unit)) * per_unit, unit)
    num_masked = int(round(num_patches * mask_ratio))
    if name == "block":
        return BlockMasks(grid, num_masked, min_block=block_min_patches)
    return GuidedMasks(grid, num_masked)


# ---- targets --------------------------------------------------------------------------------------


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, N, p*p*3], row-major patches, (p, p, c) inside a patch (MAE's layout)."""
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of `patchify`: [B, N, p*p*3] -> [B, 3, H, W]."""
    B, p, (h, w) = patches.shape[0], patch_size, grid
    x = patches.reshape(B, h, w, p, p, 3)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, 3, h * p, w * p)


class PixelTargets:
    """{"target": [B, N, p*p*3]}: the image's own patches (in the stream's normalisation), each
    optionally normalised again by its mean and variance (MAE's norm_pix)."""

    def __init__(self, patch_size: int, norm_pix: bool):
        self.patch_size, self.norm_pix = patch_size, norm_pix

    def to(self, device) -> "PixelTargets":
        return self

    def __call__(self, batch: dict) -> dict:
        target = patchify(batch["image"].float(), self.patch_size)
        if self.norm_pix:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return {"target": target}

    def describe(self) -> dict:
        return {}


class TeacherTargets:
    """{"target": [B, 1+N, C], "scores": [B, N]}: a frozen teacher's tokens (CLS first) and its last
    block's CLS attention, the teacher seeing the image in its own normalisation."""

    def __init__(self, teacher: Teacher, pixel_mean, pixel_std, config: TeacherConfig | None = None):
        self.teacher, self.config = teacher, config
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)

    def to(self, device) -> "TeacherTargets":
        self.teacher.to(device)
        return self

    def __call__(self, batch: dict) -> dict:
        out = self.teacher(batch["image"], source_mean=self.pixel_mean, source_std=self.pixel_std)
        return {"target": out.tokens, "scores": out.cls_attention}

    def describe(self) -> dict:
        """What the teacher is (its meta: library, width, input) and how to build it again (its config)."""
        config = dataclasses.asdict(self.config) if self.config is not None else {}
        return {"teacher": {**self.teacher.meta, **config}}


class TokenizerTargets:
    """{"ids": [B, N] long}: a frozen tokenizer's ids of the second view ("image_tok"), row-major."""

    def __init__(self, tokenizer: Tokenizer, source: str):
        self.tokenizer, self.source = tokenizer, source

    def to(self, device) -> "TokenizerTargets":
        self.tokenizer.to(device)
        return self

    def __call__(self, batch: dict) -> dict:
        return {"ids": self.tokenizer.tokenize(batch["image_tok"]).flatten(1)}

    def describe(self) -> dict:
        return {"tokenizer": self.source}


TARGETS = ("pixels", "teacher")  # regression targets; TokenizerTargets serves token prediction (beit.py)


# ---- decoders -------------------------------------------------------------------------------------


class LinearHead(nn.Module):
    """EVA / SimMIM head: the encoder saw every position (masked ones as its mask token); one linear map."""

    reads_all_positions = True

    def __init__(self, encoder_dim: int, grid, out_dim: int, **unused: Any):
        super().__init__()
        self.pred = nn.Linear(encoder_dim, out_dim)
        nn.init.trunc_normal_(self.pred.weight, std=0.02)
        nn.init.zeros_(self.pred.bias)

    def forward(self, latent: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.pred(latent)                                                # [B, 1+N, C]


DECODERS: Dict[str, Callable[..., nn.Module]] = {
    "prompting": PromptingDecoder,  # MILAN: mask tokens read the visible ones, which stay fixed
    "mae": MAEDecoder,  # MAE: every token attends to every token
    "linear": LinearHead,  # EVA, SimMIM: the encoder saw the mask tokens itself
}


# ---- losses: (pred [B, T, C], target [B, T, C]) -> per-token loss [B, T] ------------------------


def cosine_distance(pred, target):
    """2 - 2 cos: the squared distance of the l2-normalised vectors (MILAN)."""
    return 2 - 2 * F.cosine_similarity(pred.float(), target.float(), dim=-1)


def negative_cosine(pred, target):
    return -F.cosine_similarity(pred.float(), target.float(), dim=-1)


def squared_error(pred, target):
    return (pred.float() - target.float()).square().mean(-1)


def absolute_error(pred, target):
    return (pred.float() - target.float()).abs().mean(-1)


LOSSES: Dict[str, Callable] = {"cosine": cosine_distance, "neg_cosine": negative_cosine, "mse": squared_error,
                               "l1": absolute_error}


# ---- the regression model (inside the engine) ------------------------------------------------------


class MaskedRegression(nn.Module):
    """Student encoder + decoder + loss: `model(batch) -> {"loss", "loss_masked", "loss_visible"}` from
    batch["image"], ["ids_keep"], ["mask"] and ["target"]."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, loss: str = "cosine", loss_on: str = "all"):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"method.loss={loss!r}: expected one of {sorted(LOSSES)}")
        if loss_on not in ("all", "masked"):
            raise ValueError(f"method.loss_on={loss_on!r}: expected 'all' or 'masked'")
        self.encoder, self.decoder = encoder, decoder
        self.loss_on = loss_on
        self.per_token_loss = LOSSES[loss]
        # A head that reads every position needs the encoder to see masked patches as its mask token.
        self.visible_only = not getattr(decoder, "reads_all_positions", False)

    def forward_encoder(self, images: torch.Tensor, ids_keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.visible_only:
            return self.encoder.forward_features(images, ids_keep=ids_keep)    # [B, 1+K, D]
        return self.encoder.forward_features(images, mask=mask)                # [B, 1+N, D]

    def forward_loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor):
        """pred [B, 1+N, C]; target [B, 1+N, C] (teacher) or [B, N, C] (pixels); mask [B, N].
        Returns (loss, per-token loss [B, T], which tokens are masked [B, T])."""
        pred = pred[:, pred.shape[1] - target.shape[1]:]                        # drop CLS for patch-only targets
        per_token = self.per_token_loss(pred, target)                          # [B, T]
        has_cls = target.shape[1] == mask.shape[1] + 1
        masked = torch.cat([mask.new_zeros(mask.shape[0], 1), mask], 1) if has_cls else mask  # [B, T]
        counted = torch.ones_like(masked) if self.loss_on == "all" else masked
        return (per_token * counted).sum() / counted.sum(), per_token, masked

    def predict(self, batch: dict) -> torch.Tensor:
        latent = self.forward_encoder(batch["image"], batch["ids_keep"], batch["mask"])
        return self.decoder(latent, batch["ids_keep"])                         # [B, 1+N, C]

    def forward(self, batch: dict) -> dict:
        loss, per_token, masked = self.forward_loss(self.predict(batch), batch["target"], batch["mask"])
        with torch.no_grad():
            per_token = per_token.detach()
            metrics = {"loss_masked": (per_token * masked).sum() / masked.sum().clamp(min=1),
                       "loss_visible": (per_token * ~masked).sum() / (~masked).sum().clamp(min=1)}
        return {"loss": loss, **metrics}


# ---- picture --------------------------------------------------------------------------------------


class RegressionPicture:
    """Teacher targets: the teacher's attention, the visible patches and the error per patch. Pixel
    targets: the images with their masked patches greyed, and the reconstruction (visible patches kept,
    masked ones predicted, un-normalised per patch when the targets were)."""

    def __init__(self, pixel_mean, pixel_std, patch_size: int, grid, norm_pix: bool):
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)
        self.patch_size, self.grid, self.norm_pix = patch_size, tuple(grid), norm_pix

    @torch.no_grad()
    def __call__(self, model: MaskedRegression, batch: dict, path: Path) -> None:
        from mimkit.pictures import denormalize, save_attention_overlay, save_reconstructions

        was_training = model.training
        model.eval()  # no drop path: a picture must not draw from the training RNG (resume would diverge)
        try:
            pred = model.predict(batch).float()
            _, per_token, _ = model.forward_loss(pred, batch["target"], batch["mask"])
        finally:
            model.train(was_training)
        images = denormalize(batch["image"].float().cpu(), self.pixel_mean, self.pixel_std)
        mask = batch["mask"].cpu()
        if "scores" in batch:
            save_attention_overlay(images, batch["scores"].cpu(), mask, per_token[:, -mask.shape[1]:].cpu(), path)
            return
        source = patchify(batch["image"].float(), self.patch_size)
        patches = pred[:, -mask.shape[1]:]
        if self.norm_pix:  # back from per-patch normalisation to the image's
            patches = patches * (source.var(-1, keepdim=True) + 1e-6) ** 0.5 + source.mean(-1, keepdim=True)
        patches = torch.where(batch["mask"][..., None], patches, source)
        recon = unpatchify(patches, self.patch_size, self.grid).cpu()
        save_reconstructions(images, denormalize(recon, self.pixel_mean, self.pixel_std), path, mask=mask)


# ---- composition ----------------------------------------------------------------------------------


@dataclass
class RegressionConfig:
    """A masked-regression method's `method:` section: each part chosen by name from the tables above."""

    mask_source: str = "random"           # MASK_SOURCES: block | random | guided (teacher attention)
    mask_ratio: float = 0.75              # share of patches hidden
    mask_unit: int = 1                    # random: mask square units of this many patches a side
    block_min_patches: int = 16           # block: smallest block
    target: str = "pixels"                # TARGETS: pixels (patches) | teacher (teacher tokens, CLS included)
    norm_pix: bool = True                 # pixels: normalise each patch by its own mean / std (MAE)
    decoder: str = "mae"                  # DECODERS: prompting | mae | linear (mask-token encoder + linear head)
    decoder_dim: int = 512                # decoder width (mae / prompting)
    decoder_depth: int = 8                # decoder blocks
    decoder_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    loss: str = "mse"                     # LOSSES: cosine (2 - 2 cos) | neg_cosine (-cos) | mse | l1
    loss_on: str = "masked"               # all tokens (CLS included when the target has it) | masked
    teacher: Optional[TeacherConfig] = None  # target teacher: the frozen network


def masked_regression(cfg, m: RegressionConfig) -> Objective:
    """The Objective of a masked-regression method from the run config and its `method` section."""
    encoder = VisionTransformer(copy.deepcopy(cfg.model))
    grid, patch_size = tuple(encoder.grid_size), encoder.patch_embed.patch_size[0]
    if m.target not in TARGETS:
        raise ValueError(f"method.target={m.target!r}: expected one of {list(TARGETS)}")
    if m.decoder not in DECODERS:
        raise ValueError(f"method.decoder={m.decoder!r}: expected one of {sorted(DECODERS)}")
    if m.target == "teacher":
        if m.teacher is None:
            raise ValueError("method.target=teacher needs a method.teacher section")
        teacher = build_teacher(m.teacher, "method.teacher", cfg.engine.precision)  # messages name the key as the user wrote it
        if tuple(teacher.grid) != grid:
            raise ValueError(f"teacher grid {tuple(teacher.grid)} != student grid {grid}: the targets must align "
                             "patch for patch (pick a teacher with the same patch grid)")
        targets, out_dim = TeacherTargets(teacher, cfg.data.mean, cfg.data.std, m.teacher), teacher.output_dim
    else:
        targets, out_dim = PixelTargets(patch_size, m.norm_pix), patch_size * patch_size * 3
    masks = build_mask_source(m.mask_source, grid, m.mask_ratio, m.block_min_patches, m.mask_unit)
    if masks.needs_scores and m.target != "teacher":
        raise ValueError(f"method.mask_source={m.mask_source!r} needs a teacher's attention (method.target=teacher)")
    decoder = DECODERS[m.decoder](encoder.embed_dim, grid, out_dim, dim=m.decoder_dim, depth=m.decoder_depth,
                                  num_heads=m.decoder_heads, mlp_ratio=m.decoder_mlp_ratio)
    if getattr(decoder, "reads_all_positions", False) and encoder.mask_token is None:
        raise ValueError(f"method.decoder={m.decoder!r} needs an encoder with a mask token (model.mask_token=true)")
    picture = RegressionPicture(cfg.data.mean, cfg.data.std, patch_size, grid, m.norm_pix and m.target == "pixels")
    return Objective(model=MaskedRegression(encoder, decoder, m.loss, m.loss_on), targets=targets, masks=masks,
                     picture=picture, picture_runs_model=True, export_meta=targets.describe())
