"""Segmentation decode heads: UperNet (pyramid pooling + FPN fuse) with the FCN auxiliary head, the
protocol of the BEiT / MAE / MILAN papers (on the ViT pyramid, `mimkit.models.pyramid`), and Segmenter's
two light heads on the last block's tokens: linear and the mask transformer. Structure after
mmsegmentation's UPerHead / FCNHead and the Segmenter paper; every conv-BN-ReLU is `ConvBNReLU`.
Each head returns logits at its input's resolution (stride 4 for UperNet, the patch grid for Segmenter).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from mimkit.models.vit import Block, ViTConfig


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class Classifier(nn.Sequential):
    """Dropout 0.1 then a 1x1 conv to the classes (mmsegmentation's conv_seg), weights N(0, 0.01)."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))
        nn.init.normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


class UperNetHead(nn.Module):
    """maps [4 x [B, C_i, H_i, W_i]] (strides 4..32) -> logits [B, classes, H_0, W_0]. The coarsest map goes
    through the pyramid pooling module (average pools to 1, 2, 3, 6 cells, 1x1 conv each, upsampled, fused
    by a 3x3 conv); lateral 1x1 convs and a top-down pathway build the FPN; its levels, brought to the finest
    size and concatenated, are fused by a 3x3 conv."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        top = in_channels[-1]
        self.pools = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(top, channels, 1))
                                   for s in pool_scales)
        self.ppm_fuse = ConvBNReLU(top + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.classifier = Classifier(channels, num_classes, dropout)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        top = maps[-1]
        pooled = [_resize(pool(top), top.shape[-2:]) for pool in self.pools]
        levels = [lateral(m) for lateral, m in zip(self.laterals, maps)] + [self.ppm_fuse(torch.cat([top, *pooled], 1))]
        for i in range(len(levels) - 1, 0, -1):  # top-down: each level gets the coarser one added
            levels[i - 1] = levels[i - 1] + _resize(levels[i], levels[i - 1].shape[-2:])
        outs = [conv(level) for conv, level in zip(self.fpn_convs, levels)] + [levels[-1]]
        size = outs[0].shape[-2:]
        return self.classifier(self.fuse(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], 1)))


class FCNHead(nn.Module):
    """The auxiliary head: one 3x3 conv-BN-ReLU and the classifier on one pyramid level."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.conv = ConvBNReLU(in_channels, channels, 3)
        self.classifier = Classifier(channels, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.conv(x))


class LinearDecoder(nn.Module):
    """Segmenter's linear decoder: a linear map of each patch token to the classes. tokens [B, N, D] ->
    logits [B, classes, h, w]."""

    def __init__(self, dim: int, num_classes: int, grid: Sequence[int]):
        super().__init__()
        self.grid = tuple(grid)
        self.head = nn.Linear(dim, num_classes)
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B = tokens.shape[0]
        return self.head(tokens).transpose(1, 2).reshape(B, -1, *self.grid)


class MaskTransformer(nn.Module):
    """Segmenter's mask transformer: patch tokens (projected to `dim`) and one learned embedding per class go
    through `depth` transformer layers together; each class's mask is the scalar product of the
    L2-normalised patch and class features, then LayerNorm over the classes. The layers are called `layers`
    (not `blocks`), so layer-wise lr decay counts them with the head, not with the encoder's blocks."""

    def __init__(self, encoder_dim: int, num_classes: int, grid: Sequence[int], dim: int, depth: int,
                 heads: int, drop_path: float = 0.0):
        super().__init__()
        self.grid, self.num_classes = tuple(grid), num_classes
        self.proj_in = nn.Linear(encoder_dim, dim)
        self.class_embed = nn.Parameter(torch.zeros(1, num_classes, dim))
        cfg = ViTConfig(embed_dim=dim, num_heads=heads, depth=depth, rel_pos="none")
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.layers = nn.ModuleList(Block(cfg, rate, (1, 1), 0) for rate in rates)
        self.norm = nn.LayerNorm(dim)
        self.proj_patch = nn.Parameter(dim**-0.5 * torch.randn(dim, dim))
        self.proj_classes = nn.Parameter(dim**-0.5 * torch.randn(dim, dim))
        self.mask_norm = nn.LayerNorm(num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        trunc_normal_(self.class_embed, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, N, _ = tokens.shape
        x = torch.cat([self.proj_in(tokens), self.class_embed.expand(B, -1, -1)], 1)
        for layer in self.layers:
            x = layer(x, with_prefix=False)
        x = self.norm(x)
        patches = F.normalize(x[:, :N] @ self.proj_patch, dim=-1)
        classes = F.normalize(x[:, N:] @ self.proj_classes, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # [B, N, classes]
        return masks.transpose(1, 2).reshape(B, self.num_classes, *self.grid)
