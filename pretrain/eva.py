"""EVA-style feature regression (arXiv 2211.07636): BEiT block masking (40%), the encoder sees every
position (masked patches replaced by its mask token), a linear head maps each token to the teacher's
feature size, negative cosine similarity on the masked tokens. The teacher is the same frozen network
as MILAN's (`mimkit.teachers`); the parts are in parts.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mimkit.pretrain.objective import Method
from mimkit.pretrain.parts import RegressionConfig, masked_regression
from mimkit.teachers import TeacherConfig


@dataclass
class EvaConfig(RegressionConfig):
    mask_source: str = "block"
    mask_ratio: float = 0.4
    target: str = "teacher"
    decoder: str = "linear"
    loss: str = "neg_cosine"
    loss_on: str = "masked"
    teacher: Optional[TeacherConfig] = field(default_factory=TeacherConfig)


EVA = Method(EvaConfig, masked_regression)
