"""MILAN: masked image pretraining that regresses a frozen CLIP's features (arXiv 2208.06049).

A batch goes, in order:

1. targets (frozen, no grad, outside the engine): the teacher sees the whole image in its own
   normalisation and gives its projected tokens, CLS included [B, 1+N, C], and its last block's CLS
   attention [B, N] (`method.teacher.kind`: open_clip, or vit_export: a mimkit ViT export's normed
   tokens, as the demo uses since no CLIP weights can be downloaded there);
2. masks: semantic-aware masking keeps 25% of the patches, sampled without replacement with
   probability proportional to that attention;
3. encoder: the student ViT encodes the visible patches only (fixed 2-D sin-cos positions);
4. decoder: the prompting decoder updates only the mask tokens, the encoded visible tokens being fixed
   keys and values; a linear layer maps every position to the teacher's feature size;
5. loss: 2 - 2 cos(prediction, target) averaged over all tokens, CLS included (as the paper).

Every part is one entry of the tables in parts.py; each can be swapped in the `method:` section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mimkit.pretrain.objective import Method
from mimkit.pretrain.parts import RegressionConfig, masked_regression
from mimkit.teachers import TeacherConfig


@dataclass
class MilanConfig(RegressionConfig):
    """MILAN as the paper: guided masking, teacher targets, prompting decoder 8 x 512, 2 - 2 cos on all tokens."""

    mask_source: str = "guided"
    target: str = "teacher"
    decoder: str = "prompting"
    loss: str = "cosine"
    loss_on: str = "all"
    teacher: Optional[TeacherConfig] = field(default_factory=TeacherConfig)


MILAN = Method(MilanConfig, masked_regression)
