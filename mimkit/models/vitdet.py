"""ViTDet: the plain ViT as a detection backbone (Li et al., "Exploring Plain Vision Transformer Backbones
for Object Detection", 2022).

The encoder is the one ViT (`mimkit.models.vit.VisionTransformer`) with window attention in most blocks
and global attention in a few evenly spaced ones (`ViTConfig.window_size`, `global_blocks`); only its last
feature map is used. The simple feature pyramid builds strides 4, 8, 16, 32 from that single stride-16
map (two 2x2 transposed convolutions, one, none, a 2x2 max-pool), each followed by a 1x1 and a 3x3
convolution with channel LayerNorm, plus a stride-64 level max-pooled from the coarsest one (for the RPN).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d

from mimkit.models.vit import VisionTransformer


def evenly_spaced_global_blocks(depth: int, count: int = 4) -> List[int]:
    """Indices of `count` global-attention blocks, the last of each of `count` equal stages (ViTDet:
    blocks 2, 5, 8, 11 of ViT-B; 5, 11, 17, 23 of ViT-L). The last block is always global."""
    count = max(1, min(count, depth))
    return sorted({round(depth * (i + 1) / count) - 1 for i in range(count)})


def _upsample(dim: int, scale: float) -> tuple[nn.Module, int]:
    """The resampling of one pyramid level from the stride-p map, and its output channels."""
    if scale == 4.0:
        return nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2), nn.GELU(),
                             nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)), dim // 4
    if scale == 2.0:
        return nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), dim // 2
    if scale == 1.0:
        return nn.Identity(), dim
    if scale == 0.5:
        return nn.MaxPool2d(2, stride=2), dim
    raise ValueError(f"pyramid scale {scale} not supported (4, 2, 1, 0.5)")


class SimpleFeaturePyramid(nn.Module):
    """[B, D, h, w] at stride `stride` -> OrderedDict "p<k>" -> [B, out_dim, ., .] at stride 2**k, one per
    scale (4, 2, 1, 0.5 of stride 16: p2..p5), plus "p<k+1>" max-pooled from the last (p6) if `top_pool`."""

    def __init__(self, in_dim: int, out_dim: int = 256, scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
                 stride: int = 16, top_pool: bool = True):
        super().__init__()
        self.names, self.resample, self.project = [], nn.ModuleList(), nn.ModuleList()
        for scale in scales:
            resample, dim = _upsample(in_dim, float(scale))
            self.resample.append(resample)
            self.project.append(nn.Sequential(nn.Conv2d(dim, out_dim, 1, bias=False), LayerNorm2d(out_dim),
                                              nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False),
                                              LayerNorm2d(out_dim)))
            self.names.append(f"p{int(math.log2(stride / scale))}")
        self.top_pool = top_pool
        if top_pool:
            self.names.append(f"p{int(self.names[-1][1:]) + 1}")
        self.strides = [2 ** int(n[1:]) for n in self.names]
        self.out_channels = out_dim

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        levels = [project(resample(x)) for resample, project in zip(self.resample, self.project)]
        if self.top_pool:
            levels.append(F.max_pool2d(levels[-1], kernel_size=1, stride=2))
        return OrderedDict(zip(self.names, levels))


class ViTDetBackbone(nn.Module):
    """Images [B, 3, H, W] (H, W = the ViT's img_size) -> the pyramid's OrderedDict of feature maps.

    The ViT must have no class token (window attention) and no final norm, pooling or head: the last
    block's tokens go straight to the pyramid (its first convolutions are normalised)."""

    def __init__(self, vit: VisionTransformer, out_dim: int = 256, scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5)):
        super().__init__()
        if vit.num_prefix_tokens:
            raise ValueError("ViTDet backbone needs a ViT without class token")
        for name in ("norm", "fc_norm", "head"):
            if not isinstance(getattr(vit, name), nn.Identity):
                raise ValueError(f"ViTDet backbone uses the last block's tokens: the ViT's {name} must be Identity")
        self.vit = vit
        self.pyramid = SimpleFeaturePyramid(vit.embed_dim, out_dim, scales, stride=vit.cfg.patch_size)
        self.out_channels = out_dim

    @property
    def feature_names(self) -> List[str]:
        return list(self.pyramid.names)

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        tokens = self.vit.forward_features(images)  # [B, N, D]
        return self.pyramid(self.vit.patch_tokens_to_map(tokens))  # from [B, D, h, w]
