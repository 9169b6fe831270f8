"""MILAN: masked image pretraining that regresses a frozen CLIP's features (arXiv 2208.06049).

A batch goes, in order (the trainer runs step 1 under no-grad, outside the engine; steps 2-4 are the
trainable model inside it):

1. `MaskedRegressionTargets`: the frozen teacher sees the whole image (CLIP's normalisation) and gives
   the targets (projected tokens, CLS included, [B, 1+N, C]) and its last-block CLS attention [B, N]
   (`teacher.kind`: open_clip, or vit_export: a mimkit ViT export's normed tokens, its own normalisation);
   the mask source picks the visible patches: MILAN samples 25% without replacement with probability
   proportional to that attention (semantic-aware masking).
2. `forward_encoder`: the student ViT encodes the visible patches only (fixed 2-D sin-cos positions).
3. `forward_decoder`: the prompting decoder updates only the mask tokens, the encoded visible tokens
   being fixed keys and values; a linear layer maps every position to the teacher's feature size.
4. `forward_loss`: 2 - 2 cos(prediction, target) averaged over all tokens, CLS included (as the paper),
   or over the masked tokens only.

The same parts, chosen by name in the config, give MAE (random masking, normalised-pixel targets, MAE
decoder, MSE on masked patches: pretrain/mae.py) and EVA-style pretraining (block masking, CLIP
targets, mask-token encoder with a linear head, negative cosine on masked tokens: pretrain/eva.py),
as in mmpretrain's split into mask source, target generator, neck and head.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mimkit.checkpoint.export_format import is_export
from mimkit.data.masking import random_masking, sample_block_mask, sample_guided_visible
from mimkit.models.clip_teacher import CLIPTeacher
from mimkit.models.vit_teacher import ViTExportTeacher
from mimkit.models.decoders import MAEDecoder, PromptingDecoder

# ---- config -------------------------------------------------------------------------------------


TEACHER_KINDS = ("open_clip", "vit_export")


@dataclass
class TeacherConfig:
    # open_clip: a CLIP vision tower (model_name, pretrained, cache_dir, model_cfg below);
    # vit_export: a mimkit ViT export folder (`export`: model.safetensors + mimkit.json, a CLS token), e.g. the
    # demo's BEiT encoder: its normed tokens (no projection) and last-block CLS attention, its own pixel norm.
    kind: str = "open_clip"
    export: Optional[str] = None          # vit_export: the export folder (recorded as an absolute path)
    model_name: str = "ViT-B-16"          # any open_clip model name
    pretrained: Optional[str] = None      # an open_clip tag (from the user's cache) or a checkpoint file
    precision: str = "fp32"               # the teacher's own dtype: fp32 | bf16 | fp16
    cache_dir: Optional[str] = None       # open_clip / HF cache holding the tag's weights
    # An open_clip model config (embed_dim, vision_cfg, text_cfg) to build a random model from: tests and
    # CPU presets, where no weights can be downloaded. Overrides model_name.
    model_cfg: Optional[Dict[str, Any]] = None


@dataclass
class MaskedRegressionConfig:
    """Parts of a visible-token regression objective; each is chosen by name from the tables below."""

    mask_source: str = "guided"           # guided (teacher attention) | random | block
    mask_ratio: float = 0.75              # share of patches hidden
    block_min_patches: int = 16           # block masking: smallest block
    target: str = "clip"                  # clip (teacher tokens, CLS included) | pixels (patches)
    norm_pix: bool = True                 # pixels: normalise each patch by its own mean / std (MAE)
    decoder: str = "prompting"            # prompting | mae | linear (mask-token encoder + linear head)
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    loss: str = "cosine"                  # cosine (2 - 2 cos) | neg_cosine (-cos) | mse
    loss_on: str = "all"                  # all tokens (CLS included when the target has it) | masked
    picture_every: int = 0                # save a mask / attention / error picture every N steps (0: never)
    seed: int = 0                         # mask sampling seed (mixed with rank and call count)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)


@dataclass
class MilanConfig(MaskedRegressionConfig):
    """MILAN as the paper: guided masking, CLIP targets, prompting decoder 8 x 512, 2 - 2 cos on all tokens."""


# ---- parts: mask sources ------------------------------------------------------------------------
# Each: (batch_size, grid, num_visible, scores [B, N] or None, generator) -> ids_keep [B, K] (ascending),
# mask [B, N] bool (True = masked). All draw on the CPU generator, so masks do not depend on the device.


def guided_mask(batch_size, grid, num_visible, scores, generator, min_block=16):
    if scores is None:
        raise ValueError("mask_source 'guided' needs a teacher's attention (target 'clip')")
    return sample_guided_visible(scores.float().cpu(), num_visible, generator)


def uniform_random_mask(batch_size, grid, num_visible, scores, generator, min_block=16):
    num_patches = grid[0] * grid[1]
    ids_keep, mask, _ = random_masking(batch_size, num_patches, 1 - num_visible / num_patches, generator=generator)
    ids_keep, _ = ids_keep.sort(dim=1)  # ascending, like the other sources
    return ids_keep, mask


def block_mask(batch_size, grid, num_visible, scores, generator, min_block=16):
    num_patches = grid[0] * grid[1]
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    rng = np.random.default_rng(seed)
    mask = torch.from_numpy(np.stack([
        sample_block_mask(grid, num_patches - num_visible, min_block, rng=rng).reshape(-1)
        for _ in range(batch_size)]))                                          # [B, N], fixed count per row
    ids_keep = (~mask).nonzero(as_tuple=True)[1].view(batch_size, num_visible)  # ascending
    return ids_keep, mask


MASK_SOURCES: Dict[str, Callable] = {"guided": guided_mask, "random": uniform_random_mask, "block": block_mask}


# ---- parts: targets -----------------------------------------------------------------------------


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, N, p*p*3], row-major patches, (p, p, c) inside a patch (MAE's layout)."""
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


def pixel_targets(images: torch.Tensor, patch_size: int, norm_pix: bool) -> torch.Tensor:
    """MAE targets [B, N, p*p*3]: patches of the (normalised) image, each optionally normalised again."""
    target = patchify(images.float(), patch_size)
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    return target


TARGETS = ("clip", "pixels")


# ---- parts: losses ------------------------------------------------------------------------------
# Each: (pred [B, T, C], target [B, T, C]) -> per-token loss [B, T].


def cosine_distance(pred, target):
    """2 - 2 cos: the squared distance of the l2-normalised vectors (MILAN, mmpretrain shift 2 scale 2)."""
    return 2 - 2 * F.cosine_similarity(pred.float(), target.float(), dim=-1)


def negative_cosine(pred, target):
    return -F.cosine_similarity(pred.float(), target.float(), dim=-1)


def squared_error(pred, target):
    return (pred.float() - target.float()).square().mean(-1)


LOSSES: Dict[str, Callable] = {"cosine": cosine_distance, "neg_cosine": negative_cosine, "mse": squared_error}


# ---- parts: decoders ----------------------------------------------------------------------------


class LinearHead(nn.Module):
    """EVA-style head: the encoder saw every position (masked ones as its mask token); one linear map."""

    def __init__(self, encoder_dim: int, out_dim: int):
        super().__init__()
        self.pred = nn.Linear(encoder_dim, out_dim)
        nn.init.trunc_normal_(self.pred.weight, std=0.02)
        nn.init.zeros_(self.pred.bias)

    def forward(self, latent: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.pred(latent)                                                # [B, 1+N, C]


def build_decoder(cfg: MaskedRegressionConfig, encoder_dim: int, grid, out_dim: int) -> nn.Module:
    if cfg.decoder == "linear":
        return LinearHead(encoder_dim, out_dim)
    classes = {"prompting": PromptingDecoder, "mae": MAEDecoder}
    if cfg.decoder not in classes:
        raise ValueError(f"unknown decoder {cfg.decoder!r}; known: {sorted(classes) + ['linear']}")
    return classes[cfg.decoder](encoder_dim, grid, out_dim, dim=cfg.decoder_dim, depth=cfg.decoder_depth,
                                num_heads=cfg.decoder_heads, mlp_ratio=cfg.decoder_mlp_ratio)


# ---- step 1: targets and masks (frozen, outside the engine) -------------------------------------


def _mix_seed(*values: int) -> int:
    return int.from_bytes(hashlib.blake2b(repr(values).encode(), digest_size=8).digest(), "little") >> 1


class MaskedRegressionTargets:
    """`batch -> {"target", "ids_keep", "mask"[, "cls_attention"]}`, called under no-grad before the engine.

    Masks are drawn on a CPU generator reseeded per call from (seed, rank, calls): identical on resume
    when `calls` is restored (`state_dict`), and different on every rank.
    """

    def __init__(self, cfg: MaskedRegressionConfig, grid: tuple[int, int], patch_size: int,
                 pixel_mean, pixel_std, teacher: CLIPTeacher | ViTExportTeacher | None = None):
        if cfg.mask_source not in MASK_SOURCES:
            raise ValueError(f"unknown mask_source {cfg.mask_source!r}; known: {sorted(MASK_SOURCES)}")
        if cfg.target not in TARGETS:
            raise ValueError(f"unknown target {cfg.target!r}; known: {list(TARGETS)}")
        self.cfg = cfg
        self.grid = tuple(grid)
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_visible = int(round(self.num_patches * (1 - cfg.mask_ratio)))
        if not 0 < self.num_visible < self.num_patches:
            raise ValueError(f"mask_ratio {cfg.mask_ratio} leaves {self.num_visible} of {self.num_patches} visible")
        self.patch_size = patch_size
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)
        self.teacher = teacher
        self.sample_mask = MASK_SOURCES[cfg.mask_source]
        self.calls = 0
        self.rank = 0

    def to(self, device) -> "MaskedRegressionTargets":
        if self.teacher is not None:
            self.teacher.to(device)
        return self

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])

    def next_generator(self) -> torch.Generator:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.rank = torch.distributed.get_rank()
        g = torch.Generator().manual_seed(_mix_seed(self.cfg.seed, self.rank, self.calls))
        self.calls += 1
        return g

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        images = batch["image"]                                                # [B, 3, H, W] normalised
        out = {}
        if self.cfg.target == "clip":
            teacher_out = self.teacher(images, source_mean=self.pixel_mean, source_std=self.pixel_std)
            out["target"] = teacher_out.tokens                                 # [B, 1+N, C]
            out["cls_attention"] = teacher_out.cls_attention                   # [B, N]
        else:
            out["target"] = pixel_targets(images, self.patch_size, self.cfg.norm_pix)  # [B, N, p*p*3]
        ids_keep, mask = self.sample_mask(images.shape[0], self.grid, self.num_visible,
                                          out.get("cls_attention"), self.next_generator(),
                                          min_block=self.cfg.block_min_patches)
        out["ids_keep"] = ids_keep.to(images.device)                           # [B, K]
        out["mask"] = mask.to(images.device)                                   # [B, N] True = masked
        return out

    @property
    def picture_every(self) -> int:
        return self.cfg.picture_every

    @torch.no_grad()
    def picture(self, model: "MaskedRegressionModel", batch: dict, targets: dict, path) -> Path:
        """Save the picture for this batch: images, teacher attention, visible patches, error per patch.
        `model` is the unwrapped trainable model (the engine's module); call on one rank only."""
        images = batch["image"]
        mean = torch.tensor(self.pixel_mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.pixel_std, device=images.device).view(1, 3, 1, 1)
        was_training = model.training
        model.eval()  # no drop path: a picture must not draw from the training RNG (resume would diverge)
        try:
            error = model.per_patch_error(batch, targets)
        finally:
            model.train(was_training)
        return save_masking_picture(path, images.float() * std + mean, self.grid, targets["mask"],
                                    targets.get("cls_attention"), error)


# ---- steps 2-4: the trainable model (inside the engine) -----------------------------------------


class MaskedRegressionModel(nn.Module):
    """Student encoder + decoder + loss. `model(batch, targets) -> {"loss", metrics}`."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, loss: str = "cosine", loss_on: str = "all"):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; known: {sorted(LOSSES)}")
        if loss_on not in ("all", "masked"):
            raise ValueError(f"loss_on must be 'all' or 'masked', got {loss_on!r}")
        self.encoder = encoder
        self.decoder = decoder
        self.loss_name, self.loss_on = loss, loss_on
        self.per_token_loss = LOSSES[loss]
        # A linear head reads every position: the encoder must see masked patches as its mask token.
        self.visible_only = not isinstance(decoder, LinearHead)

    def forward_encoder(self, images: torch.Tensor, ids_keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.visible_only:
            return self.encoder.forward_features(images, ids_keep=ids_keep)    # [B, 1+K, D]
        return self.encoder.forward_features(images, mask=mask)                # [B, 1+N, D]

    def forward_decoder(self, latent: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent, ids_keep)                                  # [B, 1+N, C]

    def forward_loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor):
        """pred [B, 1+N, C]; target [B, 1+N, C] (CLIP) or [B, N, C] (pixels); mask [B, N].
        Returns (loss, per-token loss [B, T], which tokens count [B, T])."""
        pred = pred[:, pred.shape[1] - target.shape[1]:]                        # drop CLS for patch-only targets
        per_token = self.per_token_loss(pred, target)                          # [B, T]
        has_cls = target.shape[1] == mask.shape[1] + 1
        masked = torch.cat([mask.new_zeros(mask.shape[0], 1), mask], 1) if has_cls else mask  # [B, T]
        counted = torch.ones_like(masked) if self.loss_on == "all" else masked
        loss = (per_token * counted).sum() / counted.sum()
        return loss, per_token, masked

    def forward(self, batch: dict, targets: dict) -> dict:
        images = batch["image"]
        ids_keep, mask = targets["ids_keep"], targets["mask"]
        latent = self.forward_encoder(images, ids_keep, mask)
        pred = self.forward_decoder(latent, ids_keep)
        loss, per_token, masked = self.forward_loss(pred, targets["target"], mask)
        with torch.no_grad():
            per_token = per_token.detach()
            metrics = {"loss_masked": (per_token * masked).sum() / masked.sum().clamp(min=1),
                       "loss_visible": (per_token * ~masked).sum() / (~masked).sum().clamp(min=1)}
        return {"loss": loss, **metrics}

    @torch.no_grad()
    def per_patch_error(self, batch: dict, targets: dict) -> torch.Tensor:
        """[B, N] per-patch loss (CLS dropped), for pictures."""
        latent = self.forward_encoder(batch["image"], targets["ids_keep"], targets["mask"])
        pred = self.forward_decoder(latent, targets["ids_keep"])
        _, per_token, _ = self.forward_loss(pred, targets["target"], targets["mask"])
        return per_token[:, -targets["mask"].shape[1]:]


# ---- picture: attention, visible patches, error -------------------------------------------------


def save_masking_picture(path, images01: torch.Tensor, grid, mask: torch.Tensor,
                         cls_attention: torch.Tensor | None, error: torch.Tensor, max_images: int = 4) -> Path:
    """One row per image: the image, the teacher's attention heat-map, the sampled visible patches, the
    per-patch error (cosine error for CLIP targets). images01: [B, 3, H, W] in [0, 1]; the rest per patch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(max_images, images01.shape[0])
    cols = ["image", "teacher attention", "visible patches", "error per patch"]
    fig, axes = plt.subplots(n, 4, figsize=(10, 2.6 * n), squeeze=False)
    h, w = grid
    for i in range(n):
        img = images01[i].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        H, W = img.shape[:2]
        up = lambda t: np.kron(t.reshape(h, w).float().cpu().numpy(), np.ones((H // h, W // w)))  # noqa: E731
        axes[i, 0].imshow(img)
        if cls_attention is not None:
            axes[i, 1].imshow(img)
            axes[i, 1].imshow(up(cls_attention[i]), cmap="inferno", alpha=0.6)
        axes[i, 2].imshow(img * (1 - 0.8 * up(mask[i])[..., None]))
        im = axes[i, 3].imshow(up(error[i]), cmap="viridis")
        fig.colorbar(im, ax=axes[i, 3], fraction=0.046)
        for j, ax in enumerate(axes[i]):
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ---- build --------------------------------------------------------------------------------------


def build_teacher(cfg: TeacherConfig) -> CLIPTeacher | ViTExportTeacher:
    """The frozen teacher `cfg.kind` names. For vit_export, `cfg.export` is made absolute in place, so the
    run's config.yaml and its export's mimkit.json name the teacher wherever they are read from."""
    if cfg.kind not in TEACHER_KINDS:
        raise ValueError(f"unknown teacher.kind {cfg.kind!r}; known: {list(TEACHER_KINDS)}")
    if cfg.kind == "vit_export":
        if cfg.export is None or not str(cfg.export).strip():
            raise ValueError("teacher.kind is vit_export but teacher.export is empty: set it to a mimkit export "
                             "folder (model.safetensors + mimkit.json), e.g. teacher.export=runs/demo/beit/export")
        export = Path(cfg.export).expanduser().resolve()
        if not is_export(export):
            raise FileNotFoundError(f"teacher.export={cfg.export}: not a mimkit export (needs model.safetensors "
                                    "and mimkit.json)")
        cfg.export = str(export)
        return ViTExportTeacher(export, precision=cfg.precision)
    if cfg.export is not None and str(cfg.export).strip():
        # Without this, a forgotten kind would silently give an open_clip teacher (random without `pretrained`).
        raise ValueError(f"teacher.export={cfg.export} is only read with teacher.kind=vit_export "
                         f"(teacher.kind is {cfg.kind!r})")
    # The paper presets leave `pretrained` empty for the user to fill; None (random weights) is meant only
    # for benchmarks. An empty string would silently give a random teacher: refuse it.
    if cfg.model_cfg is None and cfg.pretrained is not None and not str(cfg.pretrained).strip():
        raise ValueError(f"teacher.pretrained is empty: set it to an open_clip tag for {cfg.model_name} that is "
                         "in your cache (e.g. openai, with teacher.cache_dir) or to a checkpoint file")
    return CLIPTeacher(cfg.model_name, pretrained=cfg.pretrained, model_cfg=cfg.model_cfg,
                       precision=cfg.precision, cache_dir=cfg.cache_dir)


def build_parts(cfg: MaskedRegressionConfig, encoder: nn.Module, pixel_mean, pixel_std):
    """(model, targets) from an objective config and a student encoder (a mimkit VisionTransformer)."""
    grid = tuple(encoder.grid_size)
    patch_size = encoder.patch_embed.patch_size[0]
    teacher = None
    if cfg.target == "clip":
        teacher = build_teacher(cfg.teacher)
        if tuple(teacher.grid) != grid:
            raise ValueError(f"teacher grid {teacher.grid} != student grid {grid}: the targets must align "
                             "patch for patch (pick a teacher with the same patch grid)")
        out_dim = teacher.output_dim
    else:
        out_dim = patch_size * patch_size * 3
    if cfg.decoder == "linear" and getattr(encoder, "mask_token", None) is None:
        raise ValueError("decoder 'linear' needs an encoder with a mask token (model.mask_token=true)")
    decoder = build_decoder(cfg, encoder.embed_dim, grid, out_dim)
    model = MaskedRegressionModel(encoder, decoder, cfg.loss, cfg.loss_on)
    targets = MaskedRegressionTargets(cfg, grid, patch_size, pixel_mean, pixel_std, teacher)
    return model, targets


def build_encoder(cfg) -> nn.Module:
    """The student ViT from the run config's `model` section."""
    from mimkit.models.vit import VisionTransformer

    return VisionTransformer(copy.deepcopy(cfg.model))


def build(cfg):
    """The objective table's entry for `milan`: (model, targets) from a PretrainConfig."""
    return build_parts(cfg.milan, build_encoder(cfg), cfg.data.mean, cfg.data.std)
