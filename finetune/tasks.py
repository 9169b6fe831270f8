"""The task table: `task` name -> the task ("module:attribute", a `TaskSpec`: its config section and
how it is built). Explicit, not a registry: grep a name to find its file. A task's module is imported only
when a run picks it.
"""

from __future__ import annotations

from mimkit.config import load_section, table_entry
from mimkit.finetune.task import TaskSpec

TASKS: dict[str, str] = {
    "classification": "mimkit.finetune.classification:CLASSIFICATION",  # ImageNet-style, top-1 / top-5
    "segmentation": "mimkit.finetune.segmentation:SEGMENTATION",  # ADE20K-style, mIoU (UperNet / Segmenter)
    "detection": "mimkit.finetune.detection:DETECTION",  # COCO-style boxes + instance masks, AP (ViTDet Mask R-CNN)
}


def task_for(name: str) -> TaskSpec:
    return table_entry(TASKS, name, "task")


def resolve_task(cfg):
    """The run's `options:` section validated against the chosen task's schema (parse time; idempotent)."""
    cfg.options = load_section(task_for(cfg.task).options, cfg.options, "options")
    return cfg
