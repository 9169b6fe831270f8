"""Frozen feature teachers: MILAN's targets and guided masks, VQ-KD's targets, PeCo's perceptual network.

One config (`TeacherConfig`: kind open_clip | vit_export) and one builder (`build_teacher`) for every
stage; each teacher implements `Teacher` (`teacher(images, source_mean, source_std) -> TeacherOutput`).
This package sits above `mimkit.models` and `mimkit.checkpoint` (it loads exports), never below them.
"""

from mimkit.teachers.base import (FROZEN_PRECISIONS, TEACHER_DTYPES, FrozenTeacher, Teacher, TeacherOutput,
                                  frozen_precision, teacher_dtype, to_teacher_input)
from mimkit.teachers.clip import CLIPTeacher, build_open_clip_visual, last_block_cls_attention, tiny_open_clip_cfg
from mimkit.teachers.config import TEACHER_KINDS, TeacherConfig, build_teacher, resolve_model_cfg
from mimkit.teachers.vit_export import ViTExportTeacher, vit_block_patch_tokens

__all__ = [
    "FROZEN_PRECISIONS", "TEACHER_DTYPES", "TEACHER_KINDS", "CLIPTeacher", "FrozenTeacher", "Teacher", "TeacherConfig", "TeacherOutput",
    "ViTExportTeacher", "build_open_clip_visual", "build_teacher", "frozen_precision", "last_block_cls_attention", "resolve_model_cfg",
    "teacher_dtype", "tiny_open_clip_cfg", "to_teacher_input", "vit_block_patch_tokens",
]
