"""The export format: the one place that writes and reads export folders.

An export is a folder holding two files:

- ``model.safetensors``: fp32 weights, plain names (no ``module.`` / ``encoder.`` prefix);
- ``mimkit.json``: what the weights are. An encoder export (``mimkit export``) records ``format``,
  ``version``, ``architecture`` (the ``ViTConfig`` fields), ``pixel_norm`` (mean, std, image size,
  interpolation), the pretraining run's ``export_meta`` (method, tokenizer, teacher), step, samples seen
  and the shard-list hash. A tokenizer export (``mimkit.checkpoint.tokenizer_export``) keeps its own
  fields (kind, arch, input contract) under ``format: mimkit-tokenizer/1``.

Both files are written to a temporary name and moved into place, weights first: a folder whose
``mimkit.json`` exists holds complete weights (the demo skips a stage on that file alone).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
from safetensors.torch import save_file

from mimkit.models.vit import ViTConfig

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
META_FILE = "mimkit.json"
ENCODER_FORMAT = "mimkit-export"  # mimkit.json "format" of an encoder export ...
FORMAT_VERSION = 1  # ... and its "version"
TOKENIZER_FORMAT = "mimkit-tokenizer/1"  # mimkit.json "format" of a tokenizer export

# The client-state key a pretraining checkpoint carries for `mimkit export`: a dict with at least
# EXPORT_META_FIELDS, copied verbatim into the encoder export's mimkit.json.
EXPORT_META_KEY = "export_meta"
EXPORT_META_FIELDS = ("method", "tokenizer", "teacher")

# Written when a run records no normalisation of its own (timm's and the official recipes' default).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

PathLike = Union[str, os.PathLike]


# ---- atomic files ----------------------------------------------------------------------------------
def write_atomic(path: PathLike, content: Union[str, bytes, Callable[[Path], None]]) -> None:
    """Write ``path`` through ``path.tmp`` + fsync + ``os.replace``: readers see the old file or the whole
    new one, never a half-written one. ``content`` is text, bytes, or a function that writes the given
    temporary path (safetensors' ``save_file`` writes tensors without a second copy in memory)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if callable(content):
        content(tmp)
    else:
        with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
    with open(tmp, "rb+") as f:  # the data must be on disk before the rename makes it visible
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_weights(path: PathLike, weights: Mapping[str, torch.Tensor],
                  metadata: Optional[dict[str, str]] = None) -> None:
    """A safetensors file, atomically (contiguous tensors, as safetensors requires)."""
    state = {k: v.contiguous() for k, v in weights.items()}
    write_atomic(path, lambda tmp: save_file(state, str(tmp), metadata=metadata or {"format": "pt"}))


def write_export(out_dir: PathLike, weights: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                 weights_metadata: Optional[dict[str, str]] = None) -> Path:
    """``out_dir/model.safetensors`` then ``out_dir/mimkit.json``, each atomically; returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_weights(out / WEIGHTS_FILE, weights, weights_metadata)
    write_atomic(out / META_FILE, json.dumps(dict(meta), indent=2, default=str))
    return out


def is_export(folder: PathLike) -> bool:
    """Both files of an export are there."""
    return (Path(folder) / META_FILE).is_file() and (Path(folder) / WEIGHTS_FILE).is_file()


def read_export_meta(export_dir: PathLike) -> dict[str, Any]:
    """The folder's ``mimkit.json``; FileNotFoundError naming the folder when there is none."""
    path = Path(export_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{export_dir} is not a mimkit export: no {META_FILE}")
    return json.loads(path.read_text())


# ---- ViTConfig <-> "architecture" -----------------------------------------------------------------
def architecture_of(vit: ViTConfig) -> dict[str, Any]:
    """The ``architecture`` entry of mimkit.json: every ViTConfig field."""
    return dataclasses.asdict(vit)


def vit_config_from_architecture(arch: Mapping[str, Any], **overrides: Any) -> ViTConfig:
    """A ViTConfig from an ``architecture`` dict (or a run's ``model`` section): keys that are not
    ViTConfig fields are ignored (older or newer files); ``overrides`` must be fields."""
    names = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown ViTConfig fields: {sorted(unknown)}")
    return ViTConfig(**{**{k: v for k, v in arch.items() if k in names}, **overrides})


def vit_config_from_export(meta: Mapping[str, Any], **overrides: Any) -> ViTConfig:
    """The export's architecture as a ViTConfig, with fields replaced (img_size, num_classes, rel_pos, ...)."""
    return vit_config_from_architecture(meta.get("architecture") or {}, **overrides)


# ---- pixel normalisation ---------------------------------------------------------------------------
def pixel_norm(mean: Optional[list], std: Optional[list], image_size: Any, interpolation: Optional[str]) -> dict:
    """The ``pixel_norm`` entry of mimkit.json: the input the encoder was trained on."""
    return {"mean": mean, "std": std, "image_size": image_size, "interpolation": interpolation}


def read_pixel_norm(meta: Mapping[str, Any], default_image_size: Any, where: Any = "export") -> dict:
    """``pixel_norm`` with its gaps filled: ImageNet mean / std (with a warning naming ``where``) and
    ``default_image_size`` when the export records none."""
    norm = dict(meta.get("pixel_norm") or {})
    if norm.get("mean") is None or norm.get("std") is None:
        log.warning("%s records no pixel normalisation: using ImageNet mean / std", where)
        norm["mean"], norm["std"] = list(IMAGENET_MEAN), list(IMAGENET_STD)
    return pixel_norm(list(norm["mean"]), list(norm["std"]), norm.get("image_size") or default_image_size,
                      norm.get("interpolation"))


def encoder_meta(vit: ViTConfig, norm: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    """An encoder export's mimkit.json: format, version, architecture, pixel_norm, then ``fields``."""
    return {"format": ENCODER_FORMAT, "version": FORMAT_VERSION, "architecture": architecture_of(vit),
            "pixel_norm": dict(norm), **fields}


# ---- the data a run saw ----------------------------------------------------------------------------
def shard_list_hash(spec: str) -> dict[str, Any]:
    """sha256 of the sorted shard names and sizes (the data a run saw), or of the spec when they are gone."""
    if not spec:
        return {"sha256": None, "of": "nothing (no data.shards)"}
    try:
        from mimkit.data.sources import expand_shards, is_pipe, is_url  # PIL and fsspec: only when asked
        paths = sorted(p for source in expand_shards(spec) for p in source)
        # local shards by name and size; a pipe command or a URL as written (no network for a hash)
        text = "\n".join(p if is_pipe(p) or is_url(p) else f"{os.path.basename(p)} {os.path.getsize(p)}"
                          for p in paths)
        return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "of": f"{len(paths)} shard names and sizes"}
    except (FileNotFoundError, ValueError, ImportError):
        return {"sha256": hashlib.sha256(spec.encode()).hexdigest(), "of": "the data.shards spec (shards not found)"}
