"""The one teacher config (MILAN's `milan.teacher`, VQ-KD's `teacher`, PeCo's `perceptual.teacher`) and
`build_teacher`, which turns it into a frozen `Teacher`."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from mimkit.checkpoint.export_format import is_export
from mimkit.errors import BadValue, MissingPath
from mimkit.teachers.base import FROZEN_PRECISIONS, Teacher, frozen_precision
from mimkit.teachers.clip import CLIPTeacher
from mimkit.teachers.vit_export import ViTExportTeacher

log = logging.getLogger(__name__)

TEACHER_KINDS = ("open_clip", "vit_export")


@dataclass
class TeacherConfig:
    # open_clip: a CLIP vision tower (model_name, pretrained, cache_dir, model_cfg below);
    # vit_export: a mimkit ViT export folder (`export`: model.safetensors + mimkit.json, a CLS token), e.g. the
    # demo's BEiT encoder: its normed tokens (no projection) and last-block CLS attention, its own pixel norm.
    kind: str = "open_clip"
    export: Optional[str] = None          # vit_export: the export folder (recorded as an absolute path)
    model_name: str = "ViT-B-16"          # any open_clip model name
    pretrained: Optional[str] = None      # an open_clip tag (from the user's cache) or a checkpoint file
    precision: str = "auto"               # the teacher's own dtype: auto (bf16 when the model trains in bf16/fp16, else fp32) | fp32 | bf16 | fp16
    cache_dir: Optional[str] = None       # open_clip / HF cache holding the tag's weights
    # An open_clip model config (embed_dim, vision_cfg, text_cfg) to build a random model from: tests and
    # CPU presets, where no weights can be downloaded. Overrides model_name. A mapping inline in the YAML,
    # or the path of a JSON file holding one.
    model_cfg: Optional[Any] = None

    def check(self, key: str = "teacher") -> None:
        """The checks that need no file and no network, so a config fails before any work starts.
        ``key``: where this section sits in the user's config, for the messages."""
        if self.kind not in TEACHER_KINDS:
            raise BadValue(f"unknown {key}.kind {self.kind!r}; known: {list(TEACHER_KINDS)}")
        if self.precision not in FROZEN_PRECISIONS:
            raise BadValue(f"{key}.precision={self.precision!r}: expected one of {list(FROZEN_PRECISIONS)}")
        has_export = self.export is not None and bool(str(self.export).strip())
        if self.kind == "vit_export":
            if not has_export:
                raise BadValue(f"{key}.kind is vit_export but {key}.export is empty: set it to a mimkit export "
                                 f"folder (model.safetensors + mimkit.json), e.g. {key}.export=runs/demo/beit/export")
            return
        if has_export:
            # Without this, a forgotten kind would silently give an open_clip teacher (random without `pretrained`).
            raise BadValue(f"{key}.export={self.export} is only read with {key}.kind=vit_export "
                             f"({key}.kind is {self.kind!r})")
        # The paper presets leave `pretrained` empty for the user to fill; None (random weights) is meant only
        # for benchmarks. An empty string would silently give a random teacher: refuse it.
        if self.model_cfg is None and self.pretrained is not None and not str(self.pretrained).strip():
            raise BadValue(f"{key}.pretrained is empty: set it to an open_clip tag for {self.model_name} that is "
                             f"in your cache (e.g. openai, with {key}.cache_dir) or to a checkpoint file")


def resolve_model_cfg(model_cfg: Any, key: str = "teacher.model_cfg") -> Optional[dict]:
    """An open_clip model config as a plain dict: given inline (a mapping, OmegaConf's included) or as the
    path of a JSON file (relative to the working directory). None stays None."""
    if model_cfg is None:
        return None
    if isinstance(model_cfg, Mapping):
        from omegaconf import DictConfig, OmegaConf

        return OmegaConf.to_container(model_cfg) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    if isinstance(model_cfg, (str, Path)):
        path = Path(model_cfg).expanduser()
        if not path.is_file():
            raise MissingPath(f"{key}={model_cfg}: no such file (an open_clip model-config JSON, "
                                    "or give the mapping inline)")
        loaded = json.loads(path.read_text())
        if not isinstance(loaded, dict):
            raise BadValue(f"{key}={model_cfg}: the file holds a {type(loaded).__name__}, not a model config")
        return loaded
    raise BadValue(f"{key}={model_cfg!r}: expected an open_clip model-config mapping or a JSON file path")


_warned_random: set[str] = set()


def build_teacher(cfg: TeacherConfig, key: str = "teacher", trained_precision: str = "fp32") -> Teacher:
    """The frozen teacher `cfg.kind` names. For vit_export, `cfg.export` is made absolute in place, so the
    run's config.yaml and its export's mimkit.json name the teacher wherever they are read from.
    ``key``: where the section sits in the user's config, for the messages; ``trained_precision``: the
    trained model's (engine.precision), which ``precision: auto`` follows."""
    cfg.check(key)
    precision = frozen_precision(cfg.precision, trained_precision)
    if cfg.kind == "vit_export":
        export = Path(cfg.export).expanduser().resolve()
        if not is_export(export):
            raise MissingPath(f"{key}.export={cfg.export}: not a mimkit export (needs model.safetensors "
                                    "and mimkit.json)")
        cfg.export = str(export)
        return ViTExportTeacher(export, precision=precision)
    model_cfg = resolve_model_cfg(cfg.model_cfg, f"{key}.model_cfg")
    if cfg.pretrained is None and model_cfg is None and cfg.model_name not in _warned_random:
        _warned_random.add(cfg.model_name)  # once per process and model: every rank / objective builds one
        log.warning("%s: open_clip %s has no pretrained weights: a random teacher (fine for benchmarks only)",
                    key, cfg.model_name)
    return CLIPTeacher(cfg.model_name, pretrained=cfg.pretrained, model_cfg=model_cfg,
                       precision=precision, cache_dir=cfg.cache_dir)
