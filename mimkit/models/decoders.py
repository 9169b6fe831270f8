"""Pretraining decoders for visible-only encoders (MAE, MILAN, EVA-style feature regression).

Both take the encoder's output for the visible patches (CLS first) and the indices of those patches,
and return one prediction per position of the full sequence, CLS included: [B, 1+N, out_dim].

- `MAEDecoder`: mask tokens are scattered into the masked positions, every token attends to every
  token (MAE's decoder).
- `PromptingDecoder` (MILAN): the encoded visible tokens are prompts: fixed keys and values that every
  block reads and none updates. Only the mask tokens are updated; they attend to [prompts + mask tokens].
  Visible positions come out exactly as they went in, so their predictions are a linear read-out of the
  encoder's states.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimkit.models.pos_embed import sincos_2d


class DecoderAttention(nn.Module):
    """Multi-head attention whose queries may be a subset of its keys / values (timm's qkv layout)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        assert dim % num_heads == 0, "dim must be divisible by num_heads"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: [B, Q, D] queries, context: [B, S, D] keys / values -> [B, Q, D]."""
        B, Q, D = x.shape
        S, H = context.shape[1], self.num_heads
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(x, w[:D], b[:D]).view(B, Q, H, D // H).transpose(1, 2)             # [B, H, Q, d]
        k, v = F.linear(context, w[D:], b[D:]).view(B, S, 2, H, D // H).permute(2, 0, 3, 1, 4)  # [B, H, S, d]
        out = F.scaled_dot_product_attention(q, k, v)                                  # [B, H, Q, d]
        return self.proj(out.transpose(1, 2).reshape(B, Q, D))


class DecoderBlock(nn.Module):
    """Pre-norm transformer block; with ``context`` the queries read from it instead of from themselves."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = DecoderAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        kv = h if context is None else self.norm1(context)
        x = x + self.attn(h, kv)
        return x + self.mlp(self.norm2(x))


def _init_decoder_weights(module: nn.Module) -> None:
    # MAE's init: xavier-uniform linears, zero biases, unit LayerNorms.
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _VisibleOnlyDecoder(nn.Module):
    """Shared parts: project encoder states, mask token, fixed sin-cos positions, norm and prediction."""

    def __init__(self, encoder_dim: int, grid: tuple[int, int], out_dim: int, dim: int = 512,
                 depth: int = 8, num_heads: int = 16, mlp_ratio: float = 4.0):
        super().__init__()
        self.grid = tuple(grid)
        self.num_patches = self.grid[0] * self.grid[1]
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_2d(dim, *self.grid, cls_token=True)[None], persistent=False)  # [1, 1+N, dim]
        self.blocks = nn.ModuleList([DecoderBlock(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)
        _init_decoder_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def embed_tokens(self, latent: torch.Tensor, ids_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent: [B, 1+K, E] (CLS, visible), ids_keep: [B, K] -> (visible [B, 1+K, D], masked [B, N-K, D]),
        both with their positions added; masked positions in ascending order."""
        B, K = ids_keep.shape
        visible = self.embed(latent)                                             # [B, 1+K, D]
        pos = self.pos_embed.to(visible.dtype).expand(B, -1, -1)                 # [B, 1+N, D] (fp32 buffer under bf16)
        keep_pos = torch.cat([pos[:, :1], pos[:, 1:].gather(1, _expand(ids_keep, pos.shape[-1]))], dim=1)
        visible = visible + keep_pos
        ids_masked = masked_ids(ids_keep, self.num_patches)                      # [B, N-K]
        masked = self.mask_token + pos[:, 1:].gather(1, _expand(ids_masked, pos.shape[-1]))
        return visible, masked

    def scatter_full(self, visible: torch.Tensor, masked: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """(visible [B, 1+K, D], masked [B, N-K, D]) -> [B, 1+N, D] in patch order, CLS first."""
        B, _, D = visible.shape
        ids_masked = masked_ids(ids_keep, self.num_patches)
        full = visible.new_zeros(B, self.num_patches, D)
        full = full.scatter(1, _expand(ids_keep, D), visible[:, 1:]).scatter(1, _expand(ids_masked, D), masked)
        return torch.cat([visible[:, :1], full], dim=1)

    def predict(self, states: torch.Tensor) -> torch.Tensor:
        return self.pred(self.norm(states))

    def forward(self, latent: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """latent: [B, 1+K, E] encoder output (CLS first), ids_keep: [B, K] -> predictions [B, 1+N, out_dim]."""
        return self.predict(self.forward_states(latent, ids_keep))


class MAEDecoder(_VisibleOnlyDecoder):
    """MAE decoder: all tokens (CLS, visible, mask tokens) attend to each other."""

    def forward_states(self, latent: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        visible, masked = self.embed_tokens(latent, ids_keep)
        x = self.scatter_full(visible, masked, ids_keep)                         # [B, 1+N, D]
        for block in self.blocks:
            x = block(x)
        return x                                                                 # [B, 1+N, D]


class PromptingDecoder(_VisibleOnlyDecoder):
    """MILAN's prompting decoder: visible tokens are fixed prompts (keys / values only); only mask tokens
    are updated, each block's queries being the mask tokens and its keys / values [prompts, mask tokens]."""

    def forward_states(self, latent: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        prompts, masked = self.embed_tokens(latent, ids_keep)                    # [B, 1+K, D], [B, N-K, D]
        for block in self.blocks:
            masked = block(masked, context=torch.cat([prompts, masked], dim=1))
        return self.scatter_full(prompts, masked, ids_keep)                      # [B, 1+N, D]


def masked_ids(ids_keep: torch.Tensor, num_patches: int) -> torch.Tensor:
    """[B, K] visible ids -> [B, N-K] masked ids, ascending."""
    B, K = ids_keep.shape
    is_masked = torch.ones(B, num_patches, dtype=torch.bool, device=ids_keep.device)
    is_masked.scatter_(1, ids_keep, False)
    return is_masked.nonzero(as_tuple=True)[1].view(B, num_patches - K)


def _expand(ids: torch.Tensor, dim: int) -> torch.Tensor:
    return ids.unsqueeze(-1).expand(-1, -1, dim)
