"""The one ViT every stage uses: BEiT / MAE / MILAN / ViTDet options on a timm-named encoder.

Parameter names follow timm's VisionTransformer (patch_embed.proj, cls_token, pos_embed,
blocks.i.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}, norm,
fc_norm, head), so a plain config's state dict loads into timm unchanged. BEiT extras use BEiT's
names: attn.q_bias / attn.v_bias, blocks.i.attn.relative_position_bias_table (per block) and
rel_pos_bias.relative_position_bias_table (shared). Index buffers are not saved (recomputed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, LayerScale, Mlp, PatchEmbed, trunc_normal_

from mimkit.models.pos_embed import num_relative_distances, relative_position_index, sincos_2d

QKV_BIAS = ("qkv", "qv", "none")
POS_EMBED = ("learned", "sincos", "none")
REL_POS = ("none", "block", "shared")
GLOBAL_POOL = ("token", "avg")


@dataclass
class ViTConfig:
    img_size: int = 224  # input side in pixels (position tables are built for img_size / patch_size)
    patch_size: int = 16  # pixels a patch side
    in_chans: int = 3
    embed_dim: int = 768  # width
    depth: int = 12  # blocks
    num_heads: int = 12  # attention heads (embed_dim / num_heads a head)
    mlp_ratio: float = 4.0  # MLP hidden size / width
    qkv_bias: str = "qkv"  # "qkv" | "qv" (BEiT: no k bias) | "none"
    pos_embed: str = "learned"  # "learned" | "sincos" (fixed, MAE / MILAN) | "none"
    rel_pos: str = "none"  # "none" | "block" (a table per block) | "shared" (BEiT pretraining)
    class_token: bool = True
    layer_scale_init: Optional[float] = None  # LayerScale gammas' initial value; None = no LayerScale
    drop_path: float = 0.0  # at the last block; linear from 0 at the first
    mask_token: bool = False  # BEiT: a learned token replaces masked patch embeddings
    window_size: int = 0  # ViTDet: >0 gives window attention in blocks not in global_blocks
    global_blocks: List[int] = field(default_factory=list)  # 0-based indices of global-attention blocks
    grad_checkpointing: bool = False
    num_classes: int = 0
    global_pool: str = "token"  # "token" (cls) | "avg" (mean of patch tokens)
    fc_norm: Optional[bool] = None  # norm after pooling instead of before; None: timm's rule (avg -> True)
    norm_eps: float = 1e-6
    rescale_init: bool = False  # BEiT: divide attn.proj / mlp.fc2 weights by sqrt(2 * layer id)

    def validate(self) -> None:
        for name, allowed in (("qkv_bias", QKV_BIAS), ("pos_embed", POS_EMBED),
                              ("rel_pos", REL_POS), ("global_pool", GLOBAL_POOL)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ViTConfig.{name}={getattr(self, name)!r}: expected one of {allowed}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.global_pool == "token" and not self.class_token and self.num_classes > 0:
            raise ValueError("global_pool='token' needs class_token=True")
        if self.window_size > 0:
            if self.class_token:
                raise ValueError("window attention (window_size>0) needs class_token=False (as ViTDet)")
            if self.rel_pos == "shared":
                raise ValueError("window attention cannot use a shared rel-pos table: use rel_pos='block'")
        if any(not 0 <= i < self.depth for i in self.global_blocks):
            raise ValueError(f"global_blocks {self.global_blocks} out of range for depth {self.depth}")


PRESETS: Dict[str, ViTConfig] = {
    # MAE / MILAN encoder: fixed sin-cos, qkv bias, cls token.
    "vit_base_patch16": ViTConfig(pos_embed="sincos"),
    "vit_large_patch16": ViTConfig(pos_embed="sincos", embed_dim=1024, depth=24, num_heads=16),
    # BEiT / PeCo / BEiT v2 pretraining encoder.
    "beit_base_patch16": ViTConfig(qkv_bias="qv", pos_embed="none", rel_pos="shared", layer_scale_init=0.1,
                                   mask_token=True, rescale_init=True, drop_path=0.1),
    "beit_large_patch16": ViTConfig(qkv_bias="qv", pos_embed="none", rel_pos="shared", layer_scale_init=1e-5,
                                    mask_token=True, rescale_init=True, drop_path=0.1,
                                    embed_dim=1024, depth=24, num_heads=16),
    "vit_tiny_cpu": ViTConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4),
    "beit_tiny_cpu": ViTConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, qkv_bias="qv",
                               pos_embed="none", rel_pos="shared", layer_scale_init=0.1, mask_token=True,
                               rescale_init=True),
}


def preset(name: str, **overrides) -> ViTConfig:
    """A copy of a named preset with fields replaced."""
    if name not in PRESETS:
        raise KeyError(f"unknown ViT preset {name!r}; known: {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def rel_pos_bias_from_table(
    table: torch.Tensor, index: torch.Tensor, token_index: Optional[torch.Tensor], with_prefix: bool
) -> torch.Tensor:
    """Look up an additive attention bias.

    table [R, H]; index [1+n, 1+n] (cls at 0, as `relative_position_index`);
    token_index [B, L] positions of the encoded tokens in index coordinates (visible-only mode) or None
    (all tokens, with the cls row/col only if with_prefix). Returns [1 or B, H, L, L].
    """
    if token_index is None:
        idx = index if with_prefix else index[1:, 1:]  # [L, L]
        return table[idx].permute(2, 0, 1).unsqueeze(0)
    idx = index[token_index[:, :, None], token_index[:, None, :]]  # [B, L, L]
    return table[idx].permute(0, 3, 1, 2)


class SharedRelPosBias(nn.Module):
    """One BEiT relative-position table for all blocks (BEiT pretraining)."""

    def __init__(self, window: Tuple[int, int], num_heads: int):
        super().__init__()
        self.window = tuple(window)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_relative_distances(self.window), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.window), persistent=False)

    def forward(self, token_index: Optional[torch.Tensor], with_prefix: bool) -> torch.Tensor:
        return rel_pos_bias_from_table(self.relative_position_bias_table, self.relative_position_index,
                                       token_index, with_prefix)


class Attention(nn.Module):
    """Multi-head self-attention on F.scaled_dot_product_attention; optional q/v-only bias and a
    per-block relative-position table for a (Wh, Ww) attention window."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: str = "qkv",
                 rel_pos_window: Optional[Tuple[int, int]] = None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias == "qkv")
        if qkv_bias == "qv":
            # BEiT: no k bias. It would add q.b_k to every logit of a query: softmax ignores it.
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_window = tuple(rel_pos_window) if rel_pos_window else None
        if self.rel_pos_window:
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros(num_relative_distances(self.rel_pos_window), num_heads))
            self.register_buffer("relative_position_index", relative_position_index(self.rel_pos_window),
                                 persistent=False)
        else:
            self.relative_position_bias_table = None

    def qkv_and_bias(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     token_index: Optional[torch.Tensor] = None, with_prefix: bool = True
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """x [B, L, D] -> q, k, v [B, H, L, d] and the additive logit bias [1 or B, H, L, L] (the given
        shared bias plus this block's own rel-pos table; None when there is neither)."""
        B, L, D = x.shape
        if self.q_bias is not None:
            qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
            qkv = F.linear(x, self.qkv.weight, qkv_bias)
        else:
            qkv = self.qkv(x)
        q, k, v = qkv.reshape(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.relative_position_bias_table is not None:
            own = rel_pos_bias_from_table(self.relative_position_bias_table, self.relative_position_index,
                                          token_index, with_prefix)
            bias = own if bias is None else bias + own
        return q, k, v, bias

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None,
                token_index: Optional[torch.Tensor] = None, with_prefix: bool = True) -> torch.Tensor:
        B, L, D = x.shape  # [B, L, D]
        q, k, v, bias = self.qkv_and_bias(x, bias, token_index, with_prefix)  # [B, H, L, d]
        if bias is not None:
            bias = bias.to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, H, L, d]
        return self.proj(x.transpose(1, 2).reshape(B, L, D))

    def attention_probs(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None,
                        token_index: Optional[torch.Tensor] = None, with_prefix: bool = True,
                        queries: slice = slice(None)) -> torch.Tensor:
        """[B, H, Q, L] float32: the softmax weights `forward` applies to v (same inputs) for the query rows
        `queries` (all by default), for inspection: a teacher's CLS attention asks for `slice(0, 1)` and
        never forms the L x L matrix. SDPA never returns them, so the logits are formed here in float32."""
        q, k, _, bias = self.qkv_and_bias(x, bias, token_index, with_prefix)
        logits = (q[:, :, queries].float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if bias is not None:
            logits = logits + bias[:, :, queries].float()
        return logits.softmax(dim=-1)


def window_partition(x: torch.Tensor, grid: Tuple[int, int], window: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """[B, h*w, D] -> [B * nW, window*window, D], zero-padding the grid to multiples of window."""
    B, _, D = x.shape
    h, w = grid
    x = x.reshape(B, h, w, D)
    pad_h, pad_w = (-h) % window, (-w) % window
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.reshape(B, hp // window, window, wp // window, window, D).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, D), (hp, wp)


def window_padding_bias(grid: Tuple[int, int], window: int, batch: int, dtype: torch.dtype,
                        device: torch.device) -> Optional[torch.Tensor]:
    """Additive key bias [batch * nW, 1, 1, window*window] for `window_partition`'s windows: -inf on the
    zero-padded tokens, so a window at the grid's edge attends to its real tokens only (each window holds
    at least one: the padding is less than a window). None when the window divides the grid."""
    h, w = grid
    if h % window == 0 and w % window == 0:
        return None
    real = torch.ones(1, h * w, 1, device=device)
    real, _ = window_partition(real, grid, window)  # [nW, window*window, 1], 0 where padded
    bias = torch.zeros(real.shape[:2], dtype=dtype, device=device).masked_fill(real[..., 0] == 0, float("-inf"))
    return bias.repeat(batch, 1)[:, None, None, :]


def window_unpartition(x: torch.Tensor, padded: Tuple[int, int], grid: Tuple[int, int], window: int) -> torch.Tensor:
    """Inverse of `window_partition`: [B * nW, window*window, D] -> [B, h*w, D], padding cropped."""
    hp, wp = padded
    D = x.shape[-1]
    x = x.reshape(-1, hp // window, wp // window, window, window, D).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(-1, hp, wp, D)[:, : grid[0], : grid[1]]
    return x.reshape(x.shape[0], grid[0] * grid[1], D)


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1 x)), x + ls2(mlp(norm2 x)), with drop path.
    With window > 0 the attention runs inside non-overlapping windows of the patch grid (ViTDet)."""

    def __init__(self, cfg: ViTConfig, drop_path: float, grid: Tuple[int, int], window: int):
        super().__init__()
        dim = cfg.embed_dim
        self.grid, self.window = tuple(grid), window
        attn_grid = (window, window) if window else self.grid
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias, attn_grid if cfg.rel_pos == "block" else None)
        self.ls1 = LayerScale(dim, cfg.layer_scale_init) if cfg.layer_scale_init is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.ls2 = LayerScale(dim, cfg.layer_scale_init) if cfg.layer_scale_init is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, shared_bias: Optional[torch.Tensor] = None,
                token_index: Optional[torch.Tensor] = None, with_prefix: bool = True) -> torch.Tensor:
        y = self.norm1(x)
        if self.window:
            y, padded = window_partition(y, self.grid, self.window)
            pad = window_padding_bias(self.grid, self.window, x.shape[0], y.dtype, y.device)
            y = self.attn(y, pad, with_prefix=False)
            y = window_unpartition(y, padded, self.grid, self.window)
        else:
            y = self.attn(y, shared_bias, token_index, with_prefix)
        x = x + self.drop_path1(self.ls1(y))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg = replace(cfg)  # own copy: reset_classifier edits it
        D = self.embed_dim = self.num_features = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, D)
        self.grid_size: Tuple[int, int] = tuple(self.patch_embed.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_prefix_tokens = 1 if cfg.class_token else 0
        self.global_pool = cfg.global_pool

        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.mask_token else None
        pos_len = self.num_prefix_tokens + self.num_patches
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, pos_len, D))
        elif cfg.pos_embed == "sincos":
            # A saved buffer: in the state dict under timm's name, but not a parameter, so ZeRO never
            # partitions it nor drops it from a consolidated checkpoint (frozen params go missing there).
            self.register_buffer("pos_embed", sincos_2d(D, *self.grid_size, cls_token=cfg.class_token)[None])
        else:
            self.pos_embed = None
        self.rel_pos_bias = SharedRelPosBias(self.grid_size, cfg.num_heads) if cfg.rel_pos == "shared" else None

        drop_rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        windows = [0 if (cfg.window_size == 0 or i in cfg.global_blocks) else cfg.window_size
                   for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, drop_rates[i], self.grid_size, windows[i]) for i in range(cfg.depth))

        use_fc_norm = cfg.global_pool == "avg" if cfg.fc_norm is None else cfg.fc_norm
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(D, eps=cfg.norm_eps)
        self.fc_norm = nn.LayerNorm(D, eps=cfg.norm_eps) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    # ---- init -------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # The patch projection is a linear map of flattened patches: init it like one (MAE).
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        for p in (self.cls_token, self.mask_token):
            if p is not None:
                trunc_normal_(p, std=0.02)
        if isinstance(self.pos_embed, nn.Parameter):
            trunc_normal_(self.pos_embed, std=0.02)
        if self.cfg.rescale_init:
            # BEiT: keep the residual stream's variance from growing with depth.
            for layer_id, blk in enumerate(self.blocks, start=1):
                blk.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
                blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))

    def reset_classifier(self, num_classes: int) -> None:
        self.cfg.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    # ---- encoder ----------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
              ids_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pixels [B, C, H, W] -> tokens [B, P + N (or P + K), D] with position embeddings added."""
        x = self.patch_embed(x)  # [B, N, D]
        B, N, D = x.shape
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("mask given but the model has no mask token (ViTConfig.mask_token=False)")
            w = mask.reshape(B, N, 1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        P = self.num_prefix_tokens
        if self.pos_embed is not None:  # a sin-cos buffer stays fp32 under DeepSpeed bf16 (it casts parameters only)
            x = x + self.pos_embed[:, P:].to(x.dtype)
        if ids_keep is not None:
            # Gather after adding positions, so each kept patch keeps its own position.
            x = torch.gather(x, 1, ids_keep[:, :, None].expand(-1, -1, D))  # [B, K, D]
        if self.cls_token is not None:
            cls = self.cls_token if self.pos_embed is None else self.cls_token + self.pos_embed[:, :P]
            x = torch.cat([cls.expand(B, -1, -1).to(x.dtype), x], dim=1)
        return x

    def _token_index(self, ids_keep: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """[B, P + K] positions in rel-pos index coordinates (cls 0, patch j -> j + 1), or None."""
        if ids_keep is None:
            return None
        prefix = ids_keep.new_zeros(ids_keep.shape[0], self.num_prefix_tokens)
        return torch.cat([prefix, ids_keep + 1], dim=1)

    def _run_blocks(self, x: torch.Tensor, ids_keep: Optional[torch.Tensor],
                    take: Sequence[int] = ()) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        if ids_keep is not None and any(blk.window for blk in self.blocks):
            raise ValueError("visible-only mode (ids_keep) cannot run window-attention blocks")
        with_prefix = self.num_prefix_tokens > 0
        token_index = self._token_index(ids_keep) if self.cfg.rel_pos != "none" else None
        shared = self.rel_pos_bias(token_index, with_prefix) if self.rel_pos_bias is not None else None
        checkpointing = self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled()
        outputs = {}
        for i, blk in enumerate(self.blocks):
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(blk, x, shared, token_index, with_prefix, use_reentrant=False)
            else:
                x = blk(x, shared, token_index, with_prefix)
            if i in take:
                outputs[i] = x
        return x, [outputs[i] for i in take]

    def forward_features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                         ids_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pixels [B, C, H, W] -> tokens [B, P + N, D] after the final norm (identity when the model
        pools with fc_norm, as timm / BEiT / MAE fine-tuning).

        mask [B, N] bool, True = masked: masked patch embeddings become the mask token (BEiT).
        ids_keep [B, K] long: only those patches are encoded -> [B, P + K, D] (MAE / MILAN).
        """
        x, _ = self._run_blocks(self.embed(x, mask, ids_keep), ids_keep)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: Union[int, Sequence[int]],
                              mask: Optional[torch.Tensor] = None, ids_keep: Optional[torch.Tensor] = None
                              ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """(final tokens as forward_features, [raw output of block i, i in indices]) each [B, P + N, D].

        indices: block indices (0-based; negative counts from the end) or an int n for the last n blocks.
        """
        depth = len(self.blocks)
        take = list(range(depth - indices, depth)) if isinstance(indices, int) else [i % depth for i in indices]
        if any(not 0 <= i < depth for i in take):
            raise ValueError(f"block indices {indices} out of range for depth {depth}")
        x, inter = self._run_blocks(self.embed(x, mask, ids_keep), ids_keep, take)
        return self.norm(x), inter

    def patch_tokens_to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, P + N, D] -> [B, D, h, w] (prefix dropped), for dense heads."""
        B, _, D = tokens.shape
        patches = tokens[:, self.num_prefix_tokens:]
        return patches.transpose(1, 2).reshape(B, D, *self.grid_size)

    # ---- head -------------------------------------------------------------------------------------
    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, P + N, D] -> [B, D]: the cls token, or the mean of the patch tokens."""
        if self.global_pool == "avg":
            return tokens[:, self.num_prefix_tokens:].mean(dim=1)
        return tokens[:, 0]

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.fc_norm(self.pool(tokens))  # [B, D]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
