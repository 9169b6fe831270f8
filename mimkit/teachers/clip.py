"""A frozen open_clip vision tower as a feature teacher (MILAN targets, BEiT v2 / VQ-KD targets).

What it gives, per image:
- ``tokens`` [B, 1+N, C]: every output token after the tower's final norm (``ln_post``), multiplied by the
  visual projection (``visual.proj``), CLS first. open_clip's ``output_tokens=True`` returns the patch
  tokens normed but not projected, and drops CLS from them, so we run the tower ourselves.
- ``cls_attention`` [B, N]: the last block's attention from CLS to each patch, averaged over heads.
  open_clip's attention never returns its weights, so it is recomputed from that block's qkv projection.

Input space, dtype and freezing: `mimkit.teachers.base` (the teacher sees CLIP's own normalisation,
the mean / std in the open_clip model's preprocess cfg).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimkit.teachers.base import FrozenTeacher, TeacherOutput, teacher_dtype


def build_open_clip_visual(model_name: str, pretrained: str | None = None,
                           model_cfg: dict | None = None, precision: str = "fp32",
                           cache_dir: str | None = None) -> tuple[nn.Module, dict]:
    """The vision tower of an open_clip model and its preprocess cfg (size, mean, std, interpolation).

    ``model_cfg`` (a dict like open_clip's model_configs/*.json: embed_dim, vision_cfg, text_cfg) builds a
    randomly initialised model without touching the registry (tests). Otherwise ``model_name`` is any
    open_clip name and ``pretrained`` a tag (resolved through the open_clip / HF cache) or a file path.
    """
    import open_clip

    if model_cfg is not None:
        cfg = {k: v for k, v in model_cfg.items() if k not in ("custom_text", "preprocess_cfg")}
        model = open_clip.CLIP(**cfg, cast_dtype=None)
        # open_clip's default preprocess cfg (OpenAI statistics), unless the config carries its own
        preprocess = {"size": model.visual.image_size, "mean": open_clip.OPENAI_DATASET_MEAN,
                      "std": open_clip.OPENAI_DATASET_STD, "interpolation": "bicubic",
                      **model_cfg.get("preprocess_cfg", {})}
        model = model.to(teacher_dtype(precision))
    else:
        model = open_clip.create_model(model_name, pretrained=pretrained, precision=precision,
                                       cache_dir=cache_dir)
        preprocess = dict(open_clip.get_model_preprocess_cfg(model))
    visual = model.visual
    del model  # drop the text tower
    return visual, preprocess


def _check_supported(visual: nn.Module) -> None:
    """We run the tower block by block: only open_clip's own ViT with a CLS token is supported."""
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"CLIPTeacher needs an open_clip ViT vision tower, got {type(visual).__name__} "
                         "(timm and ResNet towers are not supported)")
    if getattr(visual, "attn_pool", None) is not None:
        raise ValueError("CLIPTeacher does not support towers with an attentional pooler (CoCa)")
    if getattr(visual, "proj", None) is None:
        raise ValueError("CLIPTeacher needs a tower with a visual projection (visual.proj)")


def last_block_cls_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CLS -> patch attention of one open_clip residual block, averaged over heads.

    x: [B, L, D] the block's input (L = 1 + N, batch first). Returns [B, N]: the rows of the softmax over
    all L keys (CLS included, as the block computes it), restricted to the N patch keys.
    """
    h = block.ln_1(x)
    attn = block.attn
    if isinstance(attn, nn.MultiheadAttention):  # ResidualAttentionBlock
        num_heads, weight, bias = attn.num_heads, attn.in_proj_weight, attn.in_proj_bias
        q_norm = k_norm = nn.Identity()
        logit_scale = None
    else:  # open_clip.transformer.Attention (CustomResidualAttentionBlock)
        num_heads, weight, bias = attn.num_heads, attn.in_proj_weight, attn.in_proj_bias
        q_norm, k_norm = attn.ln_q, attn.ln_k
        logit_scale = attn.logit_scale
    B, L, D = h.shape
    head_dim = D // num_heads
    q, k, _ = F.linear(h, weight, bias).chunk(3, dim=-1)                  # [B, L, D] each
    q = q[:, :1].reshape(B, 1, num_heads, head_dim).transpose(1, 2)       # [B, H, 1, d] CLS query
    k = k.reshape(B, L, num_heads, head_dim).transpose(1, 2)              # [B, H, L, d]
    if logit_scale is not None:  # scaled cosine attention
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
        logits = logits * torch.clamp(logit_scale, max=attn.logit_scale_max).exp()
    else:
        q, k = q_norm(q), k_norm(k)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)         # [B, H, 1, L]
    probs = logits.float().softmax(dim=-1)
    return probs[:, :, 0, 1:].mean(dim=1)                                 # [B, N]


class CLIPTeacher(FrozenTeacher):
    """Frozen open_clip vision tower: projected tokens (CLS included) and last-block CLS attention.

    Args:
        model_name: any open_clip model name ("ViT-B-16", "ViT-L-14", ...).
        pretrained: None (random init: tests, benchmarks), an open_clip pretrained tag, or a file path.
        model_cfg: an open_clip model config dict to build a random model from (tests); overrides the name.
        precision: "fp32" | "bf16" | "fp16": the teacher's own dtype.
        cache_dir: the open_clip / HF cache to resolve tags from.
        mean, std: override CLIP's normalisation (default: the model's preprocess cfg).
    """

    def __init__(self, model_name: str = "ViT-B-16", pretrained: str | None = None,
                 model_cfg: dict | None = None, precision: str = "fp32",
                 cache_dir: str | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None):
        visual, preprocess = build_open_clip_visual(model_name, pretrained, model_cfg, precision, cache_dir)
        _check_supported(visual)
        super().__init__(precision, mean if mean is not None else preprocess["mean"],
                         std if std is not None else preprocess["std"], visual.image_size)
        self.visual = visual.eval().requires_grad_(False)
        self.model_name = model_name if model_cfg is None else "custom"
        self.pretrained = pretrained
        self.patch_size = tuple(visual.patch_size)     # (ph, pw)
        self.grid = tuple(visual.grid_size)            # (h, w)
        self.output_dim = int(visual.proj.shape[1])    # C: projected feature size (512 for ViT-B/16)
        self.interpolation = preprocess.get("interpolation", "bicubic")

    @property
    def meta(self) -> dict[str, Any]:
        """What an export records about the teacher."""
        return {"library": "open_clip", "model_name": self.model_name, "pretrained": self.pretrained,
                "output_dim": self.output_dim, "image_size": list(self.image_size),
                "mean": list(self.input_mean), "std": list(self.input_std)}

    @torch.no_grad()
    def forward_teacher_space(self, x: torch.Tensor) -> TeacherOutput:
        """x: [B, 3, H, W] already in CLIP's normalisation at the tower's size."""
        v = self.visual
        x = v._embeds(x.to(self.dtype))                                    # [B, 1+N, D] (ln_pre applied)
        blocks = v.transformer.resblocks
        batch_first = getattr(v.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for blk in blocks[:-1]:
            x = blk(x)
        last_in = x if batch_first else x.transpose(0, 1)                  # [B, 1+N, D]
        cls_attention = last_block_cls_attention(blocks[-1], last_in)      # [B, N]
        x = blocks[-1](x)
        if not batch_first:
            x = x.transpose(0, 1)
        tokens = v.ln_post(x) @ v.proj                                     # [B, 1+N, C]
        return TeacherOutput(tokens.float(), cls_attention.float())

    # open_clip's names for the two steps of `forward`
    to_clip_space = FrozenTeacher.to_teacher_space
    forward_clip_space = forward_teacher_space

    def patch_features(self, x: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """Per-block patch tokens [B, N, D] (unnormed, unprojected), open_clip's own ``forward_intermediates``."""
        out = self.visual.forward_intermediates(x.to(self.dtype), indices=list(layers), intermediates_only=True,
                                                output_fmt="NLC")
        return out["image_intermediates"]


def tiny_open_clip_cfg(image_size: int = 32, patch_size: int = 8, width: int = 64, layers: int = 2,
                       heads: int = 4, embed_dim: int = 48) -> dict:
    """A tiny open_clip model config for tests and CPU presets (random weights; nothing downloaded)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "patch_size": patch_size, "width": width,
                       "layers": layers, "head_width": width // heads, "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
