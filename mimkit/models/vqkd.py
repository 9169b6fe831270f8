"""BEiT v2's VQ-KD tokenizer: a ViT encoder quantised onto l2-normalised 32-d codes, trained so that a
small ViT decoder can regress a frozen teacher's (CLIP's projected) patch features from the codes.

    images [B, 3, H, W] -> ViT encoder -> patch tokens [B, N, D] -> Linear-Tanh-Linear -> [B, N, 32]
        -> l2-normalised nearest code (EMA codebook, commitment 1.0) -> ids [B, h, w]
        -> decoder ViT (patch size 1 over the code map) -> Linear-Tanh-Linear -> [B, N, C_teacher]
    loss = (1 - cos(prediction, teacher patch tokens)).mean() + commitment

Only the encoder, its task layer and the codebook are exported; the decoder and the teacher are for
training only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimkit.models.codebook import CodebookConfig, VectorQuantizer
from mimkit.models.vit import ViTConfig, VisionTransformer


@dataclass
class VQKDConfig:
    image_size: int = 224
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    heads: int = 12
    decoder_depth: int = 3
    vocab_size: int = 8192
    code_dim: int = 32
    teacher_dim: int = 512  # CLIP ViT-B/16 projected tokens
    codebook: CodebookConfig = field(default_factory=lambda: CodebookConfig(
        num_codes=8192, dim=32, l2_normalize=True, decay=0.99, beta=1.0))
    build_decoder: bool = True

    def __post_init__(self) -> None:
        self.codebook = CodebookConfig(**{**self.codebook.__dict__, "num_codes": self.vocab_size,
                                          "dim": self.code_dim, "l2_normalize": True})

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size // self.patch_size,) * 2


def task_layer(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_in), nn.Tanh(), nn.Linear(d_in, d_out))


def cosine_regression_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(pred, target); both [B, N, C]."""
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()


def align_teacher_tokens(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Teacher tokens [B, 1+n, C] (CLS first) -> patch tokens [B, h*w, C] on the tokenizer's grid."""
    patches = tokens[:, 1:]
    B, n, C = patches.shape
    side = int(round(n ** 0.5))
    if (side, side) == tuple(grid):
        return patches
    fmap = patches.transpose(1, 2).reshape(B, C, side, side)
    fmap = F.interpolate(fmap, size=grid, mode="bilinear", align_corners=False)
    return fmap.flatten(2).transpose(1, 2)


class VQKD(nn.Module):
    kind = "vqkd"

    def __init__(self, cfg: VQKDConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionTransformer(ViTConfig(img_size=cfg.image_size, patch_size=cfg.patch_size,
                                                   embed_dim=cfg.dim, depth=cfg.depth, num_heads=cfg.heads))
        self.encode_task_layer = task_layer(cfg.dim, cfg.code_dim)
        self.quantizer = VectorQuantizer(cfg.codebook)
        if cfg.build_decoder:
            h, _ = cfg.grid  # the decoder is a ViT over the code map: patch size 1, code_dim channels
            self.decoder = VisionTransformer(ViTConfig(img_size=h, patch_size=1, in_chans=cfg.code_dim,
                                                       embed_dim=cfg.dim, depth=cfg.decoder_depth,
                                                       num_heads=cfg.heads))
            self.decode_task_layer = task_layer(cfg.dim, cfg.teacher_dim)
        else:
            self.decoder = self.decode_task_layer = None

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def downsample(self) -> int:
        return self.cfg.patch_size

    def tokenizing_prefixes(self) -> tuple[str, ...]:
        return ("encoder.", "encode_task_layer.", "quantizer.embedding")

    def decoding_prefixes(self) -> tuple[str, ...]:
        return ("decoder.", "decode_task_layer.")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(images)  # [B, 1+N, D]
        return self.encode_task_layer(tokens[:, 1:])  # [B, N, code_dim]

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 3, H, W], any float dtype -> ids [B, H/p, W/p]."""
        ids = self.quantizer.lookup(self.encode(images.to(next(self.encoder.parameters()).dtype)))  # [B, N]
        return ids.reshape(ids.shape[0], *self.cfg.grid)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Codes [B, N, code_dim] -> predicted teacher patch features [B, N, teacher_dim]."""
        B, N, E = z_q.shape
        code_map = z_q.transpose(1, 2).reshape(B, E, *self.cfg.grid)
        return self.decode_task_layer(self.decoder.forward_features(code_map)[:, 1:])

    def forward(self, images: torch.Tensor, target: torch.Tensor, step: int = 0) -> dict[str, torch.Tensor]:
        """images [B, 3, H, W]; target: teacher patch tokens on this grid [B, N, teacher_dim]."""
        z_q, ids, commit = self.quantizer(self.encode(images))  # [B, N, E], [B, N]
        pred = self.decode(z_q)
        rec = cosine_regression_loss(pred, target)
        return {"loss": rec + commit, "recon_loss": rec.detach(), "commit_loss": commit.detach(),
                "ids": ids.reshape(ids.shape[0], *self.cfg.grid)}
