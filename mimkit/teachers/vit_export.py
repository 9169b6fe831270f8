"""A frozen mimkit ViT export as a feature teacher (MILAN targets without CLIP weights: the demo).

Same interface as `mimkit.models.clip_teacher.CLIPTeacher` (same `TeacherOutput`), for an encoder that
`mimkit export` wrote (``model.safetensors`` + ``mimkit.json``), read with `load_vit_export`:

- ``tokens`` [B, 1+N, C]: the encoder's output tokens after its final norm (``forward_features``), CLS
  first. No projection: C is the encoder's width (``output_dim == embed_dim``). A mimkit export has no
  projection to apply, and a random one would only rotate the targets.
- ``cls_attention`` [B, N]: the last block's attention from CLS to each patch, averaged over heads,
  recomputed from that block's own parameters (its norm1, qkv weight, q / v biases) with the softmax over
  all 1+N keys, and with the relative-position bias the block adds (the shared table of a BEiT
  pretraining encoder, and / or the block's own table) added to the logits before the softmax.

Input space. The teacher always sees the export's own pixel normalisation (``pixel_norm`` in
mimkit.json; ImageNet statistics when it records none):
- ``teacher(images_01)``: raw images in [0, 1];
- ``teacher(images, source_mean=m, source_std=s)``: images normalised with (m, s) (the student's view),
  un-normalised and re-normalised in one affine step.
Images whose size differs from the encoder's are resized (bicubic) to it.

The teacher is frozen, in eval mode, never needs grad, and runs in its own dtype (``precision``);
outputs come back as float32. Keep it out of the training engine.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimkit.checkpoint.load import load_vit_export
from mimkit.models.clip_teacher import TeacherOutput, to_teacher_input
from mimkit.models.vit import Block, VisionTransformer, rel_pos_bias_from_table

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def vit_block_cls_attention(block: Block, x: torch.Tensor, shared_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CLS -> patch attention of one mimkit ViT block (global attention, all tokens), averaged over heads.

    x: [B, L, D] the block's input (L = 1 + N, CLS first); shared_bias: [1 or B, H, L, L] the encoder's
    shared rel-pos bias (or None). Returns [B, N]: the CLS row of the softmax over all L keys (bias from
    the shared and the block's own rel-pos table added first, as the block computes it), patch columns.
    """
    if block.window:
        raise ValueError("CLS attention needs a global-attention block (this one attends within windows)")
    attn = block.attn
    h = block.norm1(x)
    B, L, D = h.shape
    H = attn.num_heads
    d = D // H
    if attn.q_bias is not None:  # BEiT: q and v biases, no k bias
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
        qkv = F.linear(h, attn.qkv.weight, bias)
    else:
        qkv = attn.qkv(h)
    q, k, _ = qkv.reshape(B, L, 3, H, d).permute(2, 0, 3, 1, 4)           # [B, H, L, d] each
    logits = (q[:, :, :1].float() @ k.float().transpose(-1, -2)) / math.sqrt(d)  # [B, H, 1, L]
    rel = shared_bias
    if attn.relative_position_bias_table is not None:
        own = rel_pos_bias_from_table(attn.relative_position_bias_table, attn.relative_position_index, None, True)
        rel = own if rel is None else rel + own
    if rel is not None:
        logits = logits + rel[:, :, :1].float()                            # the CLS query's row
    probs = logits.softmax(dim=-1)
    return probs[:, :, 0, 1:].mean(dim=1)                                   # [B, N]


class ViTExportTeacher(nn.Module):
    """Frozen mimkit ViT export: normed output tokens (CLS included, no projection) and last-block CLS attention.

    Args:
        export_dir: a mimkit export folder (model.safetensors + mimkit.json), e.g. runs/demo/beit/export.
        precision: "fp32" | "bf16" | "fp16": the teacher's own dtype.
        mean, std: override the export's pixel normalisation.
    """

    def __init__(self, export_dir: Union[str, os.PathLike], precision: str = "fp32",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        if precision not in _DTYPES:
            raise ValueError(f"precision {precision!r}: expected one of {sorted(_DTYPES)}")
        self.export_dir = str(export_dir)
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
        self.dtype = _DTYPES[precision]
        self.encoder: VisionTransformer = encoder.to(self.dtype).eval().requires_grad_(False)
        mean = tuple(mean if mean is not None else info["mean"])
        std = tuple(std if std is not None else info["std"])
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        cfg = encoder.cfg
        self.image_size = (cfg.img_size, cfg.img_size)                     # (H, W)
        self.patch_size = (cfg.patch_size, cfg.patch_size)                 # (ph, pw)
        self.grid = tuple(encoder.grid_size)                               # (h, w)
        self.output_dim = int(cfg.embed_dim)                               # C: no projection
        self.interpolation = "bicubic"
        self.export_meta = info["meta"]

    def train(self, mode: bool = True) -> "ViTExportTeacher":
        return super().train(False)  # always eval: a teacher never switches to training behaviour

    @property
    def meta(self) -> dict[str, Any]:
        """What an export records about the teacher."""
        m = self.export_meta
        return {"library": "mimkit", "kind": "vit_export", "export": str(Path(self.export_dir).resolve()),
                "method": m.get("method"), "step": m.get("step"), "output_dim": self.output_dim,
                "image_size": list(self.image_size), "mean": self.pixel_mean.flatten().tolist(),
                "std": self.pixel_std.flatten().tolist()}

    def to_teacher_space(self, images: torch.Tensor, source_mean: Sequence[float] | torch.Tensor | None = None,
                         source_std: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
        """[B, 3, H, W] images -> the export's normalisation at the encoder's size, float32."""
        return to_teacher_input(images, self.pixel_mean, self.pixel_std, self.image_size, source_mean, source_std)

    to_clip_space = to_teacher_space  # CLIPTeacher's name, for callers written against it

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
        cls_attention = vit_block_cls_attention(last, x, shared)           # [B, N]
        tokens = enc.norm(last(x, shared, None, True))                     # [B, 1+N, D]
        return TeacherOutput(tokens.float(), cls_attention.float())

    forward_clip_space = forward_teacher_space

    @torch.no_grad()
    def forward(self, images: torch.Tensor, source_mean: Sequence[float] | torch.Tensor | None = None,
                source_std: Sequence[float] | torch.Tensor | None = None) -> TeacherOutput:
        """images: raw [0, 1], or normalised with (source_mean, source_std). See the module docstring."""
        return self.forward_teacher_space(self.to_teacher_space(images, source_mean, source_std))
