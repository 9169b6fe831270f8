"""DALL-E style discrete VAE: 8x downsampling, Gumbel-softmax relaxation, logit-Laplace reconstruction.

Encoder: 7x7 conv stem, four groups of residual blocks (widths n_hid x 1, 2, 4, 8) with max-pooling
between them (three pools = 8x), then a 1x1 conv to ``vocab_size`` logits per position. Tokenizing is
the argmax of those logits. Training relaxes the one-hot with Gumbel-softmax at an annealed
temperature and adds a KL term to the uniform prior whose weight ramps up (DALL-E: tau 1 -> 1/16,
beta 0 -> 6.6). The decoder mirrors the encoder with nearest upsampling.

Pixels: the encoder sees DALL-E's mapped pixels x' = 0.8 x + 0.1 (x in [0, 1]), which is the
normalisation ``mean = -0.125, std = 1.25`` in the export, so ``(x - mean) / std = x'``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

DALLE_EPS = 0.1  # x' = (1 - 2 eps) x + eps
DALLE_MEAN = -DALLE_EPS / (1 - 2 * DALLE_EPS)  # -0.125
DALLE_STD = 1 / (1 - 2 * DALLE_EPS)  # 1.25


@dataclass
class DVAEConfig:
    vocab_size: int = 8192
    n_hid: int = 256
    blocks_per_group: int = 2
    n_init: int = 128  # decoder's first width
    recon_loss: str = "logit_laplace"  # logit_laplace | l1 | l2
    temperature_start: float = 1.0
    temperature_end: float = 1.0 / 16
    temperature_steps: int = 150_000
    kl_weight: float = 6.6
    kl_warmup_steps: int = 5000
    build_decoder: bool = True

    @property
    def downsample(self) -> int:
        return 8


def cosine_ramp(step: int, start: float, end: float, steps: int) -> float:
    """``start`` at step 0 to ``end`` at ``steps`` along a half cosine, then ``end``."""
    if steps <= 0 or step >= steps:
        return end
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * step / steps))


class ResBlock(nn.Module):
    """DALL-E block: identity (or 1x1) + gained (relu, conv3, relu, conv3, relu, conv3, relu, conv1)."""

    def __init__(self, c_in: int, c_out: int, n_layers: int):
        super().__init__()
        hid = c_out // 4
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.res = nn.Sequential(
            nn.ReLU(), nn.Conv2d(c_in, hid, 3, padding=1),
            nn.ReLU(), nn.Conv2d(hid, hid, 3, padding=1),
            nn.ReLU(), nn.Conv2d(hid, hid, 3, padding=1),
            nn.ReLU(), nn.Conv2d(hid, c_out, 1),
        )
        self.gain = 1.0 / n_layers**2  # keeps the deep residual stack near identity at init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.gain * self.res(x)


class DVAEEncoder(nn.Module):
    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        n_layers = 4 * cfg.blocks_per_group
        widths = [cfg.n_hid * m for m in (1, 2, 4, 8)]
        layers: list[nn.Module] = [nn.Conv2d(3, cfg.n_hid, 7, padding=3)]
        c = cfg.n_hid
        for g, w in enumerate(widths):
            for _ in range(cfg.blocks_per_group):
                layers.append(ResBlock(c, w, n_layers))
                c = w
            if g < 3:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.ReLU(), nn.Conv2d(c, cfg.vocab_size, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # [B, 3, H, W] -> logits [B, K, H/8, W/8]


class DVAEDecoder(nn.Module):
    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        n_layers = 4 * cfg.blocks_per_group
        widths = [cfg.n_hid * m for m in (8, 4, 2, 1)]
        layers: list[nn.Module] = [nn.Conv2d(cfg.vocab_size, cfg.n_init, 1)]
        c = cfg.n_init
        for g, w in enumerate(widths):
            for _ in range(cfg.blocks_per_group):
                layers.append(ResBlock(c, w, n_layers))
                c = w
            if g < 3:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        out = 6 if cfg.recon_loss == "logit_laplace" else 3  # logit-Laplace: mu and log-scale per channel
        layers += [nn.ReLU(), nn.Conv2d(c, out, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)  # [B, K, h, w] -> [B, 6 or 3, 8h, 8w]


def logit_laplace_nll(x: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """Mean NLL of mapped pixels ``x`` in (eps, 1 - eps) under DALL-E's logit-Laplace (constant dropped)."""
    mu, log_b = stats[:, :3], stats[:, 3:].clamp(-6.0, 6.0)
    logit_x = torch.logit(x.clamp(1e-4, 1 - 1e-4))
    return (log_b + math.log(2.0) + (logit_x - mu).abs() * torch.exp(-log_b)).mean()


class DiscreteVAE(nn.Module):
    kind = "dvae"

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = DVAEEncoder(cfg)
        self.decoder = DVAEDecoder(cfg) if cfg.build_decoder else None

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def downsample(self) -> int:
        return 8

    def tokenizing_prefixes(self) -> tuple[str, ...]:
        return ("encoder.",)

    def decoding_prefixes(self) -> tuple[str, ...]:
        return ("decoder.",)

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised (mapped) images [B, 3, H, W], any float dtype -> ids [B, H/8, W/8]."""
        return self.encoder(images.to(next(self.encoder.parameters()).dtype)).argmax(1)

    def pixels_from_output(self, out: torch.Tensor) -> torch.Tensor:
        """Decoder output -> reconstruction in the mapped pixel space (same space as the input)."""
        if self.cfg.recon_loss == "logit_laplace":
            return torch.sigmoid(out[:, :3])
        return out

    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, h, w] -> mapped pixels [B, 3, 8h, 8w]."""
        dtype = next(self.decoder.parameters()).dtype  # bf16 under a bf16 engine
        one_hot = F.one_hot(ids, self.cfg.vocab_size).permute(0, 3, 1, 2).to(dtype)
        return self.pixels_from_output(self.decoder(one_hot))

    def forward(self, images: torch.Tensor, step: int = 0) -> dict[str, torch.Tensor]:
        """images: mapped pixels [B, 3, H, W]. Returns loss terms and the reconstruction."""
        cfg = self.cfg
        tau = cosine_ramp(step, cfg.temperature_start, cfg.temperature_end, cfg.temperature_steps)
        beta = cosine_ramp(step, 0.0, cfg.kl_weight, cfg.kl_warmup_steps)
        logits = self.encoder(images)  # [B, K, h, w]
        soft = F.gumbel_softmax(logits, tau=tau, hard=False, dim=1)
        out = self.decoder(soft)
        if cfg.recon_loss == "logit_laplace":
            recon_loss = logit_laplace_nll(images, out)
        elif cfg.recon_loss == "l1":
            recon_loss = F.l1_loss(out, images)
        elif cfg.recon_loss == "l2":
            recon_loss = F.mse_loss(out, images)
        else:
            raise ValueError(f"unknown recon_loss {cfg.recon_loss!r}: logit_laplace, l1 or l2")
        # KL(q || uniform) summed over latents, divided by the number of pixel values like the NLL mean
        log_q = F.log_softmax(logits, dim=1)
        kl = (log_q.exp() * (log_q + math.log(cfg.vocab_size))).sum() / images.numel()
        loss = recon_loss + beta * kl
        return {"loss": loss, "recon_loss": recon_loss.detach(), "kl": kl.detach(),
                "temperature": torch.tensor(tau), "kl_weight": torch.tensor(beta),
                "recon": self.pixels_from_output(out), "ids": logits.detach().argmax(1)}
