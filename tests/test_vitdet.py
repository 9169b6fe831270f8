"""ViTDet backbone: window attention on a grid the window does not divide equals attention computed directly
within each window over its real tokens (padding takes no part), global blocks evenly spaced, and the simple
feature pyramid's levels and strides."""

from __future__ import annotations

import math

import torch

from mimkit.models.vit import Block, ViTConfig, VisionTransformer
from mimkit.models.vitdet import SimpleFeaturePyramid, ViTDetBackbone, evenly_spaced_global_blocks


def _direct_window_block(blk, x: torch.Tensor, grid: tuple[int, int], window: int) -> torch.Tensor:
    """The block by hand: for every window, softmax(q k^T / sqrt(d) + table[offset]) v over the window's real
    tokens only, each query against each key of its window."""
    B, N, D = x.shape
    attn, H = blk.attn, blk.attn.num_heads
    d = D // H
    y = blk.norm1(x)
    qkv = attn.qkv(y).reshape(B, N, 3, H, d)
    out = torch.zeros(B, N, H, d)
    rows, cols = torch.div(torch.arange(N), grid[1], rounding_mode="floor"), torch.arange(N) % grid[1]
    for wr in range(math.ceil(grid[0] / window)):
        for wc in range(math.ceil(grid[1] / window)):
            members = torch.nonzero((rows // window == wr) & (cols // window == wc)).flatten()
            local = (rows[members] % window) * window + cols[members] % window  # position inside the window
            q, k, v = (qkv[:, members, i].transpose(1, 2) for i in range(3))  # [B, H, n, d]
            bias = attn.relative_position_bias_table[attn.relative_position_index[1 + local[:, None], 1 + local[None]]]
            logits = q @ k.transpose(-1, -2) / math.sqrt(d) + bias.permute(2, 0, 1)
            out[:, members] = (logits.softmax(-1) @ v).transpose(1, 2)
    x = x + attn.proj(out.reshape(B, N, D))
    return x + blk.mlp(blk.norm2(x))


def test_window_attention_on_an_uneven_grid_equals_the_direct_computation():
    torch.manual_seed(0)
    cfg = ViTConfig(embed_dim=32, num_heads=4, class_token=False, rel_pos="block", window_size=3)
    grid = (5, 7)  # windows of 3: padded to 6 x 9; the edge windows hold 2 x 3, 3 x 1 and 2 x 1 real tokens
    windowed, global_ = Block(cfg, 0.0, grid, 3), Block(cfg, 0.0, grid, 0)
    with torch.no_grad():
        for blk in (windowed, global_):
            blk.attn.relative_position_bias_table.normal_(0, 1.0)  # a bias that matters
        x = torch.randn(2, grid[0] * grid[1], 32) * 2
        got, want = windowed(x, None, None, False), _direct_window_block(windowed, x, grid, 3)
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
        # a global block is one window over the whole grid (its table indexed for the grid)
        got, want = global_(x, None, None, False), _direct_window_block(global_, x, grid, max(grid))
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_global_blocks_are_evenly_spaced_and_end_at_the_last():
    assert evenly_spaced_global_blocks(12) == [2, 5, 8, 11]  # ViTDet ViT-B
    assert evenly_spaced_global_blocks(24) == [5, 11, 17, 23]  # ViT-L
    assert evenly_spaced_global_blocks(4, 2) == [1, 3]
    assert evenly_spaced_global_blocks(2) == [0, 1]


def test_simple_feature_pyramid_levels_and_strides():
    vit = VisionTransformer(ViTConfig(img_size=128, patch_size=16, embed_dim=64, depth=2, num_heads=4,
                                      class_token=False, window_size=4, global_blocks=[1], rel_pos="block",
                                      global_pool="avg", fc_norm=False))
    vit.norm = torch.nn.Identity()
    backbone = ViTDetBackbone(vit, out_dim=32)
    feats = backbone(torch.randn(2, 3, 128, 128))
    assert list(feats) == ["p2", "p3", "p4", "p5", "p6"] and backbone.pyramid.strides == [4, 8, 16, 32, 64]
    assert [tuple(f.shape) for f in feats.values()] == [(2, 32, 128 // s, 128 // s) for s in (4, 8, 16, 32, 64)]
    pyramid = SimpleFeaturePyramid(64, 32, scales=(2.0, 1.0), stride=8, top_pool=False)
    assert pyramid.names == ["p2", "p3"]
