"""The tokenizer export: what ``pretrain`` reads to turn its second view into token ids.

``export/model.safetensors`` holds only the weights tokenizing needs (encoder and codebook; the decoder
only when asked, never a teacher or perceptual network), fp32, no wrapper prefixes.
``export/mimkit.json`` holds the kind, the architecture config, and the input contract: input size,
interpolation, mean / std, vocabulary size and grid, so ``pretrain`` builds the right second view from
the export alone.

    tok = load_tokenizer("runs/tok/export")
    view = resize(crop, tok.input_size, tok.interpolation); view = (view - tok.mean) / tok.std
    ids = tok.tokenize(view)  # [B, *tok.grid]
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file

from mimkit.checkpoint.export_format import (TOKENIZER_FORMAT, WEIGHTS_FILE, is_export, read_export_meta,
                                             write_export)
from mimkit.errors import BadValue, MissingPath

REQUIRED_META = ("input_size", "interpolation", "mean", "std")


def tokenizer_classes(kind: str) -> tuple[type, type]:
    """The explicit table kind -> (config dataclass, model class)."""
    if kind == "dvae":
        from mimkit.models.dvae import DiscreteVAE, DVAEConfig
        return DVAEConfig, DiscreteVAE
    if kind == "peco":
        from mimkit.models.vqgan import VQGAN, VQGANConfig
        return VQGANConfig, VQGAN
    if kind == "vqkd":
        from mimkit.models.vqkd import VQKD, VQKDConfig
        return VQKDConfig, VQKD
    raise ValueError(f"unknown tokenizer kind {kind!r}: dvae, peco or vqkd")


def build_tokenizer_model(kind: str, arch: dict[str, Any]) -> nn.Module:
    cfg_cls, model_cls = tokenizer_classes(kind)
    return model_cls(_config_from_dict(cfg_cls, arch))


def _config_from_dict(cfg_cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (possibly nested) config dataclass from its ``asdict`` form; lists become tuples."""
    kwargs = {}
    for f in dataclasses.fields(cfg_cls):
        if f.name not in data:
            continue
        value = data[f.name]
        default = cfg_cls.__dataclass_fields__[f.name]
        sub = default.default_factory() if default.default_factory is not dataclasses.MISSING else default.default
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            value = _config_from_dict(type(sub), value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cfg_cls(**kwargs)


def _as_pair(size: Any) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))


def save_tokenizer_export(model: nn.Module, out_dir: str | os.PathLike, meta: dict[str, Any],
                          include_decoder: bool = False, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model.safetensors`` + ``mimkit.json`` into ``out_dir`` (written on rank 0 by the caller).
    ``weights``: parameter values that replace the module's (the engine's fp32 master weights of a bf16 run).

    ``meta`` must hold ``input_size`` (int or [H, W]), ``interpolation``, ``mean``, ``std``; anything
    else (step, samples seen, data hash, training config) is stored as given.
    """
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"tokenizer export meta lacks {missing}")
    model = getattr(model, "module", model)  # a DeepSpeed engine's module
    prefixes = model.tokenizing_prefixes()
    if include_decoder:
        prefixes = prefixes + model.decoding_prefixes()
    weights = weights or {}
    state = {k: weights.get(k, v).detach().float().contiguous().cpu() for k, v in model.state_dict().items()
             if k.startswith(prefixes) and v.is_floating_point()}
    state.update({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
                  if k.startswith(prefixes) and not v.is_floating_point()})
    h, w = _as_pair(meta["input_size"])
    arch = dataclasses.asdict(model.cfg)
    arch["build_decoder"] = include_decoder
    info = dict(meta)
    info.update({
        "format": TOKENIZER_FORMAT,
        "kind": model.kind,
        "arch": arch,
        "input_size": [h, w],
        "mean": [float(m) for m in meta["mean"]],
        "std": [float(s) for s in meta["std"]],
        "vocab_size": int(model.vocab_size),
        "grid": [h // model.downsample, w // model.downsample],
        "has_decoder": include_decoder,
    })
    return write_export(out_dir, state, info, weights_metadata={"format": TOKENIZER_FORMAT, "kind": model.kind})


class Tokenizer:
    """A frozen tokenizer loaded from an export: ``tokenize(images) -> ids [B, h, w]``.

    Images must already be at ``input_size`` and normalised with ``mean`` / ``std``.
    """

    def __init__(self, model: nn.Module, info: dict[str, Any]):
        self.model = model.eval().requires_grad_(False)
        self.info = info
        self.kind: str = info["kind"]
        self.input_size: tuple[int, int] = tuple(info["input_size"])  # type: ignore[assignment]
        self.interpolation: str = info["interpolation"]
        self.mean: tuple[float, ...] = tuple(info["mean"])
        self.std: tuple[float, ...] = tuple(info["std"])
        self.vocab_size: int = int(info["vocab_size"])
        self.grid: tuple[int, int] = tuple(info["grid"])  # type: ignore[assignment]

    def to(self, *args: Any, **kwargs: Any) -> "Tokenizer":
        self.model.to(*args, **kwargs)
        return self

    def normalize(self, images01: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> the tokenizer's normalisation."""
        mean = torch.tensor(self.mean, device=images01.device, dtype=images01.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images01.device, dtype=images01.dtype).view(1, -1, 1, 1)
        return (images01 - mean) / std

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != self.input_size:
            raise ValueError(f"tokenizer expects {self.input_size} inputs, got {tuple(images.shape[-2:])}")
        return self.model.tokenize(images)

    __call__ = tokenize


def load_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu", key: str | None = None) -> Tokenizer:
    """Load an export folder written by :func:`save_tokenizer_export`; ``key``: the config key that named
    it, for the messages."""
    where = f"{key}={path}" if key else str(path)
    path = Path(path)
    if not is_export(path):
        raise MissingPath(f"{where}: not a tokenizer export (a folder with mimkit.json and model.safetensors, "
                          "as the tokenizers stage writes into RUN/export)")
    info = read_export_meta(path)
    if info.get("format") != TOKENIZER_FORMAT:
        raise BadValue(f"{where}: mimkit.json's format {info.get('format')!r} is not {TOKENIZER_FORMAT!r} "
                       "(a ViT export where a tokenizer export belongs?)")
    weights_path = path / WEIGHTS_FILE
    model = build_tokenizer_model(info["kind"], info["arch"])
    state = load_file(str(weights_path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    needed = [k for k in missing if k.startswith(model.tokenizing_prefixes())]
    if needed or unexpected:
        raise ValueError(f"{weights_path}: missing {needed[:5]}, unexpected {unexpected[:5]}")
    return Tokenizer(model.to(device), info)


def save_random_tokenizer_export(out_dir: str | os.PathLike, kind: str = "dvae", input_size: int = 32,
                                 seed: int = 0, **arch: Any) -> Path:
    """A randomly initialised tokenizer export (tests of ``pretrain`` use it; nothing is trained).

    Tiny defaults per kind; ``arch`` overrides config fields (e.g. ``vocab_size=64``).
    """
    cfg_cls, model_cls = tokenizer_classes(kind)
    defaults: dict[str, dict[str, Any]] = {
        "dvae": {"vocab_size": 64, "n_hid": 16, "blocks_per_group": 1, "n_init": 16},
        "peco": {"channels": 16, "channel_mult": (1, 1, 2, 2, 2), "num_res_blocks": 1, "embed_dim": 16,
                 "vocab_size": 64},
        "vqkd": {"image_size": input_size, "patch_size": 8, "dim": 32, "depth": 1, "heads": 2,
                 "decoder_depth": 1, "vocab_size": 64, "code_dim": 16, "teacher_dim": 32},
    }
    merged = {**defaults[kind], **arch}
    torch.manual_seed(seed)
    model = model_cls(_config_from_dict(cfg_cls, merged))
    if hasattr(model, "quantizer"):
        model.quantizer.initialized.fill_(True)
    from mimkit.models.dvae import DALLE_MEAN, DALLE_STD
    if kind == "dvae":
        mean, std = [DALLE_MEAN] * 3, [DALLE_STD] * 3
    else:
        mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    meta = {"input_size": input_size, "interpolation": "lanczos" if kind == "dvae" else "bicubic",
            "mean": mean, "std": std, "trained": False}
    return save_tokenizer_export(model, out_dir, meta)
