"""PeCo's tokenizer: a VQGAN-style convolutional autoencoder with 16x downsampling and an EMA codebook.

Encoder (taming-transformers layout): conv stem, one level per ``channel_mult`` entry with
``num_res_blocks`` GroupNorm/SiLU residual blocks, a strided conv between levels (five levels = four
halvings = 16x, so a 224 crop gives 14x14 ids), a middle res-attn-res stage at the lowest resolution,
then a 1x1 conv to the code dimension. The decoder mirrors it with nearest upsampling.

The model's own loss is pixel reconstruction + the codebook commitment term (the codebook itself moves
by EMA, see ``codebook.py``); the perceptual and optional adversarial terms need frozen or separate
networks and are added by the trainer (``mimkit.tokenizers.losses``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimkit.models.codebook import CodebookConfig, VectorQuantizer


@dataclass
class VQGANConfig:
    vocab_size: int = 8192
    embed_dim: int = 256  # code dimension
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # five levels: 16x downsampling
    num_res_blocks: int = 2
    recon_loss: str = "l1"  # l1 | l2
    codebook: CodebookConfig = field(default_factory=lambda: CodebookConfig(num_codes=8192, dim=256, beta=0.25))
    build_decoder: bool = True

    def __post_init__(self) -> None:
        # one source of truth for the vocabulary and code size
        self.codebook = CodebookConfig(**{**self.codebook.__dict__, "num_codes": self.vocab_size,
                                          "dim": self.embed_dim})

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


def group_norm(c: int) -> nn.GroupNorm:
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0)
    return nn.GroupNorm(groups, c, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SpatialSelfAttention(nn.Module):
    """Single-head attention over the h*w positions of the lowest-resolution map."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = group_norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # [B, HW, C] each
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # [B, HW, C]
        return x + self.proj(h.transpose(1, 2).reshape(B, C, H, W))


def middle_stage(c: int) -> nn.Sequential:
    return nn.Sequential(ResnetBlock(c, c), SpatialSelfAttention(c), ResnetBlock(c, c))


class VQGANEncoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, cfg.channels, 3, padding=1)]
        c = cfg.channels
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResnetBlock(c, cfg.channels * mult))
                c = cfg.channels * mult
            if level < len(cfg.channel_mult) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # halve
        layers += [middle_stage(c), group_norm(c), nn.SiLU(), nn.Conv2d(c, cfg.embed_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # [B, 3, H, W] -> [B, E, H/16, W/16]


class VQGANDecoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        c = cfg.channels * cfg.channel_mult[-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.embed_dim, c, 3, padding=1), middle_stage(c)]
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResnetBlock(c, cfg.channels * mult))
                c = cfg.channels * mult
            if level > 0:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        layers += [group_norm(c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)  # [B, E, h, w] -> [B, 3, 16h, 16w]


class VQGAN(nn.Module):
    kind = "peco"

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = VQGANEncoder(cfg)
        self.quantizer = VectorQuantizer(cfg.codebook)
        self.decoder = VQGANDecoder(cfg) if cfg.build_decoder else None

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def downsample(self) -> int:
        return self.cfg.downsample

    def tokenizing_prefixes(self) -> tuple[str, ...]:
        return ("encoder.", "quantizer.embedding")

    def decoding_prefixes(self) -> tuple[str, ...]:
        return ("decoder.",)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images).permute(0, 2, 3, 1)  # [B, h, w, E]

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 3, H, W], any float dtype -> ids [B, H/16, W/16]."""
        return self.quantizer.lookup(self.encode(images.to(next(self.encoder.parameters()).dtype)))

    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, h, w] -> reconstruction [B, 3, 16h, 16w] in the input's normalisation."""
        return self.decoder(self.quantizer.embed_ids(ids).permute(0, 3, 1, 2))

    def forward(self, images: torch.Tensor, step: int = 0) -> dict[str, torch.Tensor]:
        z = self.encode(images)  # [B, h, w, E]
        z_q, ids, commit = self.quantizer(z)
        recon = self.decoder(z_q.permute(0, 3, 1, 2))  # [B, 3, H, W]
        if self.cfg.recon_loss == "l1":
            recon_loss = F.l1_loss(recon, images)
        elif self.cfg.recon_loss == "l2":
            recon_loss = F.mse_loss(recon, images)
        else:
            raise ValueError(f"unknown recon_loss {self.cfg.recon_loss!r}: l1 or l2")
        return {"loss": recon_loss + commit, "recon_loss": recon_loss.detach(), "commit_loss": commit.detach(),
                "recon": recon, "ids": ids}
