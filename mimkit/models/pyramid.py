"""A 4-scale feature pyramid from a plain ViT (BEiT / MAE segmentation, ViTDet-style dense heads).

The outputs of four blocks, spread over the depth (blocks 4, 6, 8, 12 of 12; the same fractions of other
depths), are laid out as maps of the patch grid (stride 16 for 16-px patches) and brought to strides
4, 8, 16, 32: two 2x transposed convolutions (BatchNorm + GELU between), one, the identity, a 2x max-pool.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from mimkit.models.vit import VisionTransformer

# Blocks (1-based) of a 12-block ViT whose outputs feed the pyramid, as in BEiT's segmentation configs.
REFERENCE_BLOCKS = (4, 6, 8, 12)


def pyramid_blocks(depth: int) -> list[int]:
    """0-based indices of the blocks feeding the pyramid: 3, 5, 7, 11 for depth 12, proportional otherwise."""
    return [max(1, round(depth * b / 12)) - 1 for b in REFERENCE_BLOCKS]


class ViTPyramid(nn.Module):
    """encoder + the four necks: images [B, 3, H, W] -> 4 maps [B, D, H/p*4, ...], [.. *2], [.. *1], [.. /2]
    (p the patch size; H and W the encoder's input size). `blocks`: 0-based block indices (default
    :func:`pyramid_blocks`)."""

    def __init__(self, encoder: VisionTransformer, blocks: Optional[Sequence[int]] = None):
        super().__init__()
        self.encoder = encoder
        self.blocks = list(blocks) if blocks is not None else pyramid_blocks(encoder.cfg.depth)
        if len(self.blocks) != 4:
            raise ValueError(f"the pyramid takes 4 blocks, got {self.blocks}")
        # Nothing after the last block taken reaches the output: drop those blocks and the final norms, whose
        # parameters would get no gradient (DDP refuses such parameters).
        del encoder.blocks[max(self.blocks) + 1:]
        encoder.norm, encoder.fc_norm, encoder.head = nn.Identity(), nn.Identity(), nn.Identity()
        D = encoder.embed_dim
        self.up4 = nn.Sequential(nn.ConvTranspose2d(D, D, 2, stride=2), nn.BatchNorm2d(D), nn.GELU(),
                                 nn.ConvTranspose2d(D, D, 2, stride=2))
        self.up2 = nn.ConvTranspose2d(D, D, 2, stride=2)
        self.same = nn.Identity()
        self.down2 = nn.MaxPool2d(2)
        self.channels = [D] * 4

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        _, tokens = self.encoder.forward_intermediates(images, self.blocks)
        maps = [self.encoder.patch_tokens_to_map(t) for t in tokens]  # 4 x [B, D, h, w]
        return [neck(m) for neck, m in zip((self.up4, self.up2, self.same, self.down2), maps)]
