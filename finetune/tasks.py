"""The task table: `task` name -> the task ("module:attribute", a `TaskSpec`: its config section and
how it is built). Explicit, not a registry: grep a name to find its file. A task's module is imported only
when a run picks it.
"""

from __future__ import annotations

import difflib
import importlib

from mimkit.config import ConfigError, load_section
from mimkit.finetune.task import TaskSpec

TASKS: dict[str, str] = {
    "classification": "mimkit.finetune.classification:CLASSIFICATION",  # ImageNet-style, top-1 / top-5
    "segmentation": "mimkit.finetune.segmentation:SEGMENTATION",  # ADE20K-style, mIoU (UperNet / Segmenter)
    "detection": "mimkit.finetune.detection:DETECTION",  # COCO-style boxes + instance masks, AP (ViTDet Mask R-CNN)
}


def task_for(name: str) -> TaskSpec:
    if name not in TASKS:
        match = difflib.get_close_matches(name, TASKS, n=1)
        hint = f" (did you mean '{match[0]}'?)" if match else ""
        raise ConfigError(f"bad value for config key 'task': {name!r}{hint}; known: {sorted(TASKS)}")
    module, attribute = TASKS[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def resolve_task(cfg):
    """The run's `options:` section validated against the chosen task's schema (parse time; idempotent)."""
    cfg.options = load_section(task_for(cfg.task).options, cfg.options, "options")
    return cfg
