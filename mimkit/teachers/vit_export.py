"""A frozen mimkit ViT export as a feature teacher (MILAN targets without CLIP weights: the demo).

Same interface as `mimkit.teachers.clip.CLIPTeacher` (same `TeacherOutput`), for an encoder that
`mimkit export` wrote (``model.safetensors`` + ``mimkit.json``), read with `load_vit_export`:

- ``tokens`` [B, 1+N, C]: the encoder's output tokens after its final norm (``forward_features``), CLS
  first. No projection: C is the encoder's width (``output_dim == embed_dim``). A mimkit export has no
  projection to apply, and a random one would only rotate the targets.
- ``cls_attention`` [B, N]: the last block's attention from CLS to each patch, averaged over heads: the
  CLS row of that block's own attention probabilities (`Attention.attention_probs`: the softmax over all
  1+N keys, the relative-position bias the block adds included), patch columns.

Input space, dtype and freezing: `mimkit.teachers.base` (the teacher sees the export's own pixel
normalisation, ``pixel_norm`` in mimkit.json; ImageNet statistics when it records none).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence, Union

import torch
import torch.nn as nn

from mimkit.checkpoint.load import load_vit_export
from mimkit.models.vit import VisionTransformer
from mimkit.teachers.base import FrozenTeacher, TeacherOutput


def vit_block_patch_tokens(vit: VisionTransformer, x: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
    """Per-block patch tokens [B, N, D] of a mimkit ViT (raw block outputs, prefix tokens dropped)."""
    _, inter = vit.forward_intermediates(x, list(layers))
    return [t[:, vit.num_prefix_tokens:] for t in inter]


class ViTExportTeacher(FrozenTeacher):
    """Frozen mimkit ViT export: normed output tokens (CLS included, no projection) and last-block CLS attention.

    Args:
        export_dir: a mimkit export folder (model.safetensors + mimkit.json), e.g. runs/demo/beit/export.
        precision: "fp32" | "bf16" | "fp16": the teacher's own dtype.
        mean, std: override the export's pixel normalisation.
    """

    def __init__(self, export_dir: Union[str, os.PathLike], precision: str = "fp32",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        encoder, info = load_vit_export(export_dir, num_classes=0, drop_path=0.0, grad_checkpointing=False)
        report = info["report"]
        if report.missing:  # a teacher with randomly initialised parts teaches nothing
            raise ValueError(f"{export_dir}: the export does not fill the encoder: missing {report.missing}")
        if encoder.cls_token is None:
            raise ValueError(f"{export_dir}: the teacher needs an encoder with a class token (CLS attention)")
        if isinstance(encoder.norm, nn.Identity):
            raise ValueError(f"{export_dir}: the encoder pools then normalises (fc_norm): it has no final norm "
                             "for its tokens")
        if encoder.blocks[-1].window:
            raise ValueError(f"{export_dir}: the last block uses window attention: no CLS attention to read")
        cfg = encoder.cfg
        super().__init__(precision, mean if mean is not None else info["mean"],
                         std if std is not None else info["std"], (cfg.img_size, cfg.img_size))
        self.export_dir = str(export_dir)
        self.encoder: VisionTransformer = encoder.to(self.dtype).eval().requires_grad_(False)
        self.patch_size = (cfg.patch_size, cfg.patch_size)                 # (ph, pw)
        self.grid = tuple(encoder.grid_size)                               # (h, w)
        self.output_dim = int(cfg.embed_dim)                               # C: no projection
        self.interpolation = "bicubic"
        self.export_meta = info["meta"]

    @property
    def meta(self) -> dict[str, Any]:
        """What an export records about the teacher."""
        m = self.export_meta
        return {"library": "mimkit", "kind": "vit_export", "export": str(Path(self.export_dir).resolve()),
                "method": m.get("method"), "step": m.get("step"), "output_dim": self.output_dim,
                "image_size": list(self.image_size), "mean": list(self.input_mean), "std": list(self.input_std)}

    @torch.no_grad()
    def forward_teacher_space(self, x: torch.Tensor) -> TeacherOutput:
        """x: [B, 3, H, W] already in the export's normalisation at the encoder's size.
        Runs the blocks as `forward_features` does (all tokens, CLS first), reading the last block's input."""
        enc = self.encoder
        x = enc.embed(x.to(self.dtype))                                    # [B, 1+N, D]
        shared = enc.rel_pos_bias(None, True) if enc.rel_pos_bias is not None else None  # [1, H, L, L]
        for blk in enc.blocks[:-1]:
            x = blk(x, shared, None, True)
        last = enc.blocks[-1]
        probs = last.attn.attention_probs(last.norm1(x), shared, queries=slice(0, 1))  # [B, H, 1, 1+N]: CLS row
        cls_attention = probs[:, :, 0, 1:].mean(1)                         # [B, N]: CLS query, patch keys
        tokens = enc.norm(last(x, shared, None, True))                     # [B, 1+N, D]
        return TeacherOutput(tokens.float(), cls_attention.float())

    def patch_features(self, x: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        return vit_block_patch_tokens(self.encoder, x.to(self.dtype), layers)
