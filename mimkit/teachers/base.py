"""What every frozen teacher shares: its output, its input conversion, and the `Teacher` interface.

A teacher maps images to ``TeacherOutput`` (tokens with CLS first, and the last block's CLS attention).
It always sees its own pixel normalisation at its own size, whatever the caller's:
- ``teacher(images_01)``: raw images in [0, 1];
- ``teacher(images, source_mean=m, source_std=s)``: images normalised with (m, s) (the student's view);
  they are un-normalised and re-normalised with the teacher's statistics in one affine step.
Images whose size differs from the teacher's are resized (bicubic) to it.

A teacher is frozen, in eval mode, never needs grad, and runs in its own dtype (``precision``); outputs
come back as float32. Keep it out of the training engine: it is not part of what is trained or checkpointed.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, Sequence, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F

TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FROZEN_PRECISIONS = ("auto", *TEACHER_DTYPES)  # what a frozen network's `precision` key accepts


def frozen_precision(requested: str, trained: str) -> str:
    """The dtype name a frozen network (teacher, tokenizer) runs in. ``auto`` follows the trained model:
    fp32 training keeps it fp32; bf16 or fp16 training runs it in bf16 under no-grad (half the memory
    and time of fp32, and bf16 has fp32's range, so no activation overflows whatever trains)."""
    if requested != "auto":
        return requested
    return "fp32" if trained == "fp32" else "bf16"


def teacher_dtype(precision: str) -> torch.dtype:
    if precision not in TEACHER_DTYPES:
        raise ValueError(f"teacher precision {precision!r}: expected one of {sorted(TEACHER_DTYPES)}")
    return TEACHER_DTYPES[precision]


class TeacherOutput(NamedTuple):
    tokens: torch.Tensor         # [B, 1+N, C] output tokens, CLS first (float32)
    cls_attention: torch.Tensor  # [B, N] last-block CLS->patch attention, head mean (float32)


@runtime_checkable
class Teacher(Protocol):
    """What objectives and tokenizer training read from a teacher (`CLIPTeacher`, `ViTExportTeacher`)."""

    grid: tuple[int, int]                # (h, w) patch grid of the tokens
    output_dim: int                      # C
    image_size: tuple[int, int]          # (H, W) the teacher's input size
    input_mean: tuple[float, ...]        # the teacher's own pixel normalisation
    input_std: tuple[float, ...]

    @property
    def meta(self) -> dict[str, Any]: ...  # what an export records about the teacher

    def to(self, device) -> "Teacher": ...

    def __call__(self, images: torch.Tensor, source_mean: Sequence[float] | torch.Tensor | None = None,
                 source_std: Sequence[float] | torch.Tensor | None = None) -> TeacherOutput: ...

    def patch_features(self, x: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]: ...


def to_teacher_input(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, size: tuple[int, int],
                     source_mean: Sequence[float] | torch.Tensor | None = None,
                     source_std: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """[B, 3, H, W] images -> a teacher's own normalisation (``mean``/``std``, [1, 3, 1, 1]) at ``size``, float32.

    Without ``source_mean``/``source_std`` the images are raw [0, 1]; with them, they are normalised
    with those statistics (the student's view) and are un-normalised first.
    """
    x = images.float()
    if (source_mean is None) != (source_std is None):
        raise ValueError("give both source_mean and source_std, or neither")
    if source_mean is not None:
        m = torch.as_tensor(source_mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        s = torch.as_tensor(source_std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        x = x * s + m  # back to [0, 1]
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bicubic", align_corners=False).clamp_(0, 1)
    return (x - mean) / std


class FrozenTeacher(nn.Module):
    """The shared half of a teacher: dtype, pixel normalisation buffers, input size, always-eval, and
    ``forward`` = ``forward_teacher_space(to_teacher_space(images))``. Subclasses build their network
    and implement ``forward_teacher_space`` and ``patch_features``."""

    def __init__(self, precision: str, mean: Sequence[float], std: Sequence[float], image_size: Sequence[int]):
        super().__init__()
        self.dtype = teacher_dtype(precision)
        self.input_mean, self.input_std = tuple(mean), tuple(std)
        self.register_buffer("pixel_mean", torch.tensor(self.input_mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.input_std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.image_size = tuple(image_size)  # (H, W)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)  # always eval: a teacher never switches to training behaviour

    def to_teacher_space(self, images: torch.Tensor, source_mean: Sequence[float] | torch.Tensor | None = None,
                         source_std: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
        """[B, 3, H, W] images -> the teacher's normalisation at its size, float32."""
        return to_teacher_input(images, self.pixel_mean, self.pixel_std, self.image_size, source_mean, source_std)

    def forward_teacher_space(self, x: torch.Tensor) -> TeacherOutput:
        raise NotImplementedError

    def patch_features(self, x: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """x in the teacher's space at its size -> the patch tokens [B, N, C] after each block in
        ``layers`` (0-based), prefix dropped. Not under no-grad: a loss may backpropagate to x (PeCo)."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor, source_mean: Sequence[float] | torch.Tensor | None = None,
                source_std: Sequence[float] | torch.Tensor | None = None) -> TeacherOutput:
        """images: raw [0, 1], or normalised with (source_mean, source_std). See the module docstring."""
        return self.forward_teacher_space(self.to_teacher_space(images, source_mean, source_std))
