"""Loss terms of tokenizer training that need networks other than the tokenizer.

- ``PerceptualLoss``: distances between deep features of the input and of the reconstruction at
  several layers of a frozen network (PeCo): a teacher's tower (`mimkit.teachers`: an open_clip vision
  tower or a mimkit ViT export) or any network with a feature function; frozen, in eval mode and never
  part of the engine.
- ``PatchDiscriminator`` + hinge losses: the optional adversarial term (off by default). The
  discriminator trains in the same engine step as the tokenizer: its loss sees the reconstruction
  detached, and the generator's term goes through a parameter-detached copy of it, so neither term
  pushes the other network.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from mimkit.teachers import Teacher

FeatureFn = Callable[[torch.Tensor], list[torch.Tensor]]  # images in the net's space -> [B, N, C] per layer


class PerceptualLoss(nn.Module):
    """Mean over layers of the squared distance between channel-normalised features (LPIPS without
    learned weights): ``sum_c (f(x)/|f(x)| - f(y)/|f(y)|)^2`` averaged over tokens.

    ``src_mean`` / ``src_std``: the normalisation of the images given to ``forward``;
    ``net_mean`` / ``net_std`` / ``net_size``: what the frozen network expects.
    """

    def __init__(self, net: nn.Module, features: FeatureFn, net_size: tuple[int, int],
                 net_mean: Sequence[float], net_std: Sequence[float],
                 src_mean: Sequence[float], src_std: Sequence[float]):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.features = features
        self.net_size = tuple(net_size)
        # one affine map: source normalisation -> [0, 1] -> the network's normalisation
        src_m, src_s = torch.tensor(src_mean), torch.tensor(src_std)
        net_m, net_s = torch.tensor(net_mean), torch.tensor(net_std)
        self.register_buffer("scale", (src_s / net_s).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((src_m - net_m) / net_s).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_teacher(cls, teacher: Teacher, layers: Sequence[int], src_mean: Sequence[float],
                     src_std: Sequence[float]) -> "PerceptualLoss":
        """On a teacher's tower: its patch tokens after ``layers``, at its input size and normalisation."""
        return cls(teacher, partial(teacher.patch_features, layers=list(layers)), teacher.image_size,
                   teacher.input_mean, teacher.input_std, src_mean, src_std)

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)  # frozen network: always eval

    def to_net_space(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() * self.scale + self.shift
        if tuple(x.shape[-2:]) != self.net_size:
            x = F.interpolate(x, size=self.net_size, mode="bilinear", align_corners=False)
        return x

    def forward(self, images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = [F.normalize(f.float(), dim=-1) for f in self.features(self.to_net_space(images))]
        pred = [F.normalize(f.float(), dim=-1) for f in self.features(self.to_net_space(recon))]
        return torch.stack([(p - t).pow(2).sum(-1).mean() for p, t in zip(pred, target)]).mean()


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / VQGAN): strided convs to a map of real / fake logits [B, 1, h, w]."""

    def __init__(self, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, n_layers + 1):
            c_out = channels * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(c, c_out, 4, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def generator_adversarial_loss(disc: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    """-D(fake), with D's parameters detached so this term only moves the generator."""
    params = {k: v.detach() for k, v in disc.named_parameters()}
    buffers = dict(disc.named_buffers())
    return -functional_call(disc, {**params, **buffers}, (fake,)).mean()
