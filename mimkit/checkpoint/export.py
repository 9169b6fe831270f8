"""`mimkit export runs/NAME [--step N] [--timm]`: a ZeRO checkpoint to the plain export fine-tuning reads.

Writes ``runs/NAME/export/model.safetensors`` (fp32 encoder weights only, timm names, no ``module.`` /
``encoder.`` prefix; no teacher, tokenizer, decoder or optimizer state) and ``export/mimkit.json``
(architecture, pixel normalisation, step, samples seen, shard-list hash, and the checkpoint's client entry
``export_meta`` copied verbatim: method, tokenizer, teacher). Both are written by
:mod:`mimkit.checkpoint.export_format`, which owns the format.
``--timm`` also writes ``export/timm_model.safetensors`` for ``timm.create_model(**json["timm"])``.

The fp32 master weights are rebuilt from the optimizer partitions of every rank, for each ZeRO stage:

- stage 1/2: each rank holds a slice of each group's flat fp32 vector: concatenate, cut by ``param_shapes``;
- stage 3: each parameter is split into ``world_size`` equal padded pieces, one per rank;
- stage 0: fp32 runs keep full weights in ``module``; bf16 runs keep a flat fp32 copy per group with no
  name list (DeepSpeed's converter crashes on it): we match it to the names by value.

Frozen parameters are not in the optimizer: ZeRO-1 does not list them at all, ZeRO-2/3 keep them in the
engine's dtype (bf16 in bf16 runs). They are taken from the module state, and where they are not fp32 a
fixed table the architecture computes (sin-cos positions) is restored from a freshly built encoder.

Every file is first checked against the sizes and SHA-256 hashes of ``complete.json`` (a damaged
checkpoint is refused by file name), then read with ``torch.load(weights_only=True)``; only DeepSpeed's
three plain record types are allowed on top, so a checkpoint that carries code is refused
(:mod:`mimkit.checkpoint.safe_load`, shared with resume).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from mimkit.checkpoint.export_format import (EXPORT_META_FIELDS, EXPORT_META_KEY, encoder_meta, pixel_norm,
                                             read_export_meta, shard_list_hash, vit_config_from_architecture,
                                             write_export, write_weights)
from mimkit.checkpoint.safe_load import CheckpointError, load_tensors_only
from mimkit.checkpoint.store import COMPLETE, LATEST, UNIVERSAL, summarize_problems, inspect_checkpoint
from mimkit.errors import UserError
from mimkit.models.vit import ViTConfig, VisionTransformer

_STEP_TAG = re.compile(r"^step_(\d+)$")


class ExportError(UserError, RuntimeError):
    """The run folder or checkpoint cannot be exported (not finished, wrong layout, not a run)."""


# ---- reading DeepSpeed files safely --------------------------------------------------------------
def load_checkpoint_file(path: Path) -> dict:
    """The allow-listed reader resume uses too (:func:`mimkit.checkpoint.safe_load.load_tensors_only`),
    its refusal as an ExportError."""
    try:
        return load_tensors_only(path)
    except CheckpointError as err:
        raise ExportError(str(err)) from err


def verify_files(tag_dir: Path) -> None:
    """Refuse a checkpoint whose files do not match the sizes and hashes of its completion record;
    warn for one saved before records held hashes."""
    found = inspect_checkpoint(tag_dir, unpickle=False)  # each file is unpickled (allow-listed) once, below
    if found["damaged"]:
        raise ExportError(f"{tag_dir} is damaged: {summarize_problems(found['damaged'])}")
    if not found["hashed"]:
        print(f"mimkit export: warning: {tag_dir / COMPLETE} records no file hashes (saved before they were "
              "recorded): exporting it unverified", file=sys.stderr)


# ---- finding a finished checkpoint ---------------------------------------------------------------
def find_checkpoint(run_dir: Path, step: Optional[int] = None, universal: bool = False) -> Path:
    """The tag folder of ``step`` (default: the one ``latest`` names); refuse half-written ones. ``universal``:
    the universal form of it in ``checkpoints/universal/`` (default: the newest there), which a resume on
    another world size or ZeRO stage wrote."""
    ckpts = run_dir / "checkpoints" / (UNIVERSAL if universal else "")
    if not ckpts.is_dir():
        raise ExportError(f"{run_dir} is not a run folder with {'universal ' if universal else ''}checkpoints "
                          f"({ckpts} is missing)")
    if step is None and universal:
        step = max((int(m.group(1)) for p in ckpts.iterdir() if (m := _STEP_TAG.match(p.name))), default=-1)
    if step is None:
        pointer = ckpts / LATEST
        if not pointer.is_file():
            raise ExportError(f"{ckpts} has no '{LATEST}' pointer: no finished checkpoint to export")
        tag_dir = ckpts / pointer.read_text().strip()
    else:
        found = [p for p in ckpts.iterdir() if p.is_dir() and (m := _STEP_TAG.match(p.name)) and int(m.group(1)) == step]
        if not found:
            steps = sorted(int(m.group(1)) for p in ckpts.iterdir() if (m := _STEP_TAG.match(p.name)))
            raise ExportError(f"no checkpoint for step {step} in {ckpts} (steps there: {steps or 'none'})")
        tag_dir = found[0]
    if not (tag_dir / COMPLETE).is_file():
        raise ExportError(f"{tag_dir} is not a finished checkpoint (no {COMPLETE}: a rank died while saving?)")
    return tag_dir


def _model_state_files(tag_dir: Path) -> list[Path]:
    files = sorted(tag_dir.glob("*mp_rank_00_model_states.pt"), key=_rank_of)
    if not files:
        raise ExportError(f"{tag_dir} holds no DeepSpeed model states (*mp_rank_00_model_states.pt)")
    return files


def _rank_of(path: Path) -> int:
    m = re.search(r"zero_pp_rank_(\d+)_", path.name)
    return int(m.group(1)) if m else 0


# ---- fp32 consolidation, one function per layout -------------------------------------------------
def _params_in_order(param_shapes) -> list[tuple[str, torch.Size]]:
    return [(name, torch.Size(shape)) for group in param_shapes for name, shape in group.items()]


def merge_zero12(optim_states: list[dict], param_shapes: list[dict]) -> dict[str, torch.Tensor]:
    """Stage 1/2: concatenate each group's fp32 slices over ranks, then cut by the group's shapes."""
    out = {}
    paddings = optim_states[0].get("param_alignment_paddings")
    for g, shapes in enumerate(param_shapes):
        flat = torch.cat([s["single_partition_of_fp32_groups"][g] for s in optim_states])
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            n = torch.Size(shape).numel()
            out[name] = flat[offset:offset + n].view(shape).clone()
            offset += n + (paddings[g][i] if paddings else 0)
        if offset > flat.numel():
            raise ExportError(f"group {g}: shapes need {offset} values, the ranks hold {flat.numel()}")
    return out


def merge_zero3(optim_states: list[dict], param_shapes: list[dict]) -> dict[str, torch.Tensor]:
    """Stage 3: every parameter is split in world_size pieces of ceil(n / world_size), padded at the end."""
    world = len(optim_states)
    flats = [torch.cat(list(s["fp32_flat_groups"])) for s in optim_states]
    out, offset = {}, 0
    for name, shape in _params_in_order(param_shapes):
        n = shape.numel()
        piece = -(-n // world)
        full = torch.cat([f[offset:offset + piece] for f in flats])
        out[name] = full[:n].view(shape).clone()
        offset += piece
    if offset * world > sum(f.numel() for f in flats):
        raise ExportError("ZeRO-3 partitions are shorter than the parameter shapes: inconsistent checkpoint")
    return out


def match_flat_groups(flat_groups: list[torch.Tensor], module: dict[str, torch.Tensor],
                      candidates: list[str]) -> dict[str, torch.Tensor]:
    """Stage 0 in bf16: flat fp32 vectors without names. Walk each group and give each slice to the next
    parameter (module order) whose stored low-precision value is that slice rounded; frozen ones never match."""
    out: dict[str, torch.Tensor] = {}
    remaining = list(candidates)
    for g, flat in enumerate(flat_groups):
        offset = 0
        while offset < flat.numel():
            for name in remaining:
                stored = module[name]
                n = stored.numel()
                piece = flat[offset:offset + n]
                if piece.numel() == n and torch.equal(piece.to(stored.dtype).view(stored.shape), stored):
                    out[name] = piece.view(stored.shape).clone()
                    remaining = remaining[remaining.index(name) + 1:]  # group order follows module order
                    offset += n
                    break
            else:
                raise ExportError(f"stage-0 fp32 group {g}: no parameter matches the values at offset {offset}")
        remaining = [n for n in candidates if n not in out]
    return out


def consolidate_fp32(tag_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(full fp32 state of the engine's module, client state, notes on how each part was recovered)."""
    model_files = _model_state_files(tag_dir)
    model_states = [load_checkpoint_file(f) for f in model_files]
    first = model_states[0]
    module = first["module"]
    stage = int(first.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    world = int(first.get("dp_world_size", 1))
    buffers = set(first.get("buffer_names") or [])
    notes: dict[str, Any] = {"zero_stage": stage, "world_size": world, "low_precision": []}

    if (tag_dir / "zero").is_dir():  # DeepSpeed's universal form: one fp32.pt per parameter, whole
        notes["zero_stage"] = f"universal (from ZeRO-{stage})"
        trained = {p.name: load_checkpoint_file(p / "fp32.pt")["param"].float()
                   for p in sorted((tag_dir / "zero").iterdir()) if (p / "fp32.pt").is_file()}
    elif stage == 0:
        opt = first.get("optimizer") or {}
        candidates = [k for k in module if k not in buffers]
        if all(module[k].dtype == torch.float32 for k in candidates):
            trained = {k: module[k].clone() for k in candidates}  # fp32 run: the module is the master copy
        elif "fp32_groups_flat" in opt:
            trained = match_flat_groups(list(opt["fp32_groups_flat"]), module, candidates)
        else:
            raise ExportError(f"{tag_dir}: stage-0 low-precision checkpoint without fp32 master weights")
    else:
        optim_files = sorted(tag_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=_rank_of)
        if len(optim_files) != world:
            raise ExportError(f"{tag_dir}: {len(optim_files)} optimizer partitions for {world} ranks: "
                              "the checkpoint is incomplete")
        optim_states = [load_checkpoint_file(f)["optimizer_state_dict"] for f in optim_files]
        param_shapes = first["param_shapes"]
        merge = merge_zero3 if stage == 3 else merge_zero12
        trained = merge(optim_states, param_shapes)

    state: dict[str, torch.Tensor] = {}
    for name, value in module.items():  # buffers and frozen parameters, in the module's order
        if name in trained:
            state[name] = trained[name]
            continue
        if stage == 3 and value.numel() == 0:  # partitioned frozen parameter: stitch the fragments
            shape = first["frozen_param_shapes"][name]
            pieces = [s["frozen_param_fragments"][name].reshape(-1) for s in model_states]
            value = torch.cat(pieces)[:torch.Size(shape).numel()].view(shape)
        if value.is_floating_point() and value.dtype != torch.float32:
            notes["low_precision"].append(name)
        state[name] = value.float() if value.is_floating_point() else value.clone()
    client = {k: v for k, v in first.items() if k not in _DEEPSPEED_KEYS}
    return state, client, notes


_DEEPSPEED_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                   "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
                   "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size",
                   "checkpoint_parallel_dimensions", "ds_config", "ds_version", "ranks", "engine"}


# ---- the encoder and its description ---------------------------------------------------------------
def encoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys under ``encoder.`` (the objective's student), prefix removed; teacher / decoder / heads dropped."""
    for prefix in ("module.encoder.", "encoder.", "backbone."):
        inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if inner:
            return inner
    if any(k.startswith("blocks.") for k in state):  # the engine held a bare encoder
        return dict(state)
    raise ExportError("no encoder weights in the checkpoint (expected keys under 'encoder.')")


def vit_config_from_run(cfg: dict) -> ViTConfig:
    """The run's ``model`` section as a ViTConfig (unknown keys ignored, a head removed)."""
    model = cfg.get("model") or {}
    if isinstance(model.get("encoder"), dict):
        model = model["encoder"]
    return vit_config_from_architecture(model, num_classes=0, drop_path=0.0, grad_checkpointing=False)


def restore_fixed_tables(enc: dict[str, torch.Tensor], vit_cfg: ViTConfig, low_precision: list[str]) -> list[str]:
    """Frozen tables saved in bf16 that the architecture computes itself (sin-cos positions): take the
    exact fp32 values when they agree with the saved ones to bf16 precision."""
    fresh = VisionTransformer(vit_cfg).state_dict()
    restored = []
    for name in [n[len("encoder."):] if n.startswith("encoder.") else n for n in low_precision]:
        if name in enc and name in fresh and fresh[name].shape == enc[name].shape \
                and torch.allclose(fresh[name], enc[name], rtol=1e-2, atol=1e-2):
            enc[name] = fresh[name].clone()
            restored.append(name)
    return restored


# What export computes itself: a run's export_meta may not replace these.
_COMPUTED_FIELDS = ("format", "version", "architecture", "pixel_norm", "step", "samples_seen", "shards", "source",
                    "timm")


def run_export_meta(client: dict[str, Any], tag_dir: Path) -> dict[str, Any]:
    """The checkpoint's ``export_meta`` client entry (method, tokenizer, teacher, ...), checked, to copy
    into mimkit.json verbatim: export knows no method names, the pretraining run says what it was."""
    meta = client.get(EXPORT_META_KEY)
    if not isinstance(meta, dict):
        raise ExportError(f"{tag_dir}: the checkpoint's client state has no '{EXPORT_META_KEY}' dict (method, "
                          "tokenizer, teacher): it was not saved by a mimkit pretraining run that records one")
    missing = [k for k in EXPORT_META_FIELDS if k not in meta]
    if missing or not isinstance(meta["method"], str):
        raise ExportError(f"{tag_dir}: '{EXPORT_META_KEY}' needs {list(EXPORT_META_FIELDS)} with a str method; "
                          f"missing {missing}, method {meta.get('method')!r}")
    clashing = [k for k in meta if k in _COMPUTED_FIELDS]
    if clashing:
        raise ExportError(f"{tag_dir}: '{EXPORT_META_KEY}' sets {clashing}, which export computes itself")
    return dict(meta)


def timm_spec(vit: ViTConfig) -> dict[str, Any]:
    """``timm.create_model`` arguments for this architecture: timm's ViT for plain configs, timm's Beit
    for q/v biases or relative positions."""
    common = dict(img_size=vit.img_size, patch_size=vit.patch_size, in_chans=vit.in_chans, embed_dim=vit.embed_dim,
                  depth=vit.depth, num_heads=vit.num_heads, mlp_ratio=vit.mlp_ratio, num_classes=0,
                  init_values=vit.layer_scale_init, global_pool=vit.global_pool)
    if vit.qkv_bias == "qv" or vit.rel_pos != "none":
        if not vit.class_token:
            raise ExportError("timm's Beit always has a class token; this encoder has none")
        kwargs = dict(common, qkv_bias=vit.qkv_bias == "qv", use_abs_pos_emb=vit.pos_embed != "none",
                      use_rel_pos_bias=vit.rel_pos == "block", use_shared_rel_pos_bias=vit.rel_pos == "shared",
                      use_fc_norm=vit.global_pool == "avg" if vit.fc_norm is None else vit.fc_norm)
        return {"model_name": "beit_base_patch16_224", "kwargs": kwargs}
    kwargs = dict(common, qkv_bias=vit.qkv_bias == "qkv", class_token=vit.class_token, fc_norm=vit.fc_norm,
                  pos_embed="none" if vit.pos_embed == "none" else "learn")
    return {"model_name": "vit_base_patch16_224", "kwargs": kwargs}


def to_timm_state(enc: dict[str, torch.Tensor], spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    if spec["model_name"].startswith("beit"):
        from mimkit.checkpoint.timm_layout import to_timm_beit_state_dict
        return to_timm_beit_state_dict(enc)
    return {k: v for k, v in enc.items() if k != "mask_token"}


# ---- the command ---------------------------------------------------------------------------------
def _load_run_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ExportError(f"{run_dir} has no config.yaml: not a run folder")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


def export_run(run_dir: str | os.PathLike, step: Optional[int] = None, timm: bool = False,
               out_dir: str | os.PathLike | None = None, universal: bool = False) -> Path:
    """Export the checkpoint of ``step`` (default: latest) of a pretraining run, or with ``universal`` its
    universal form; returns the export folder."""
    run_dir = Path(run_dir)
    cfg = _load_run_config(run_dir)
    tag_dir = find_checkpoint(run_dir, step, universal)
    verify_files(tag_dir)
    state, client, notes = consolidate_fp32(tag_dir)
    enc = encoder_state(state)
    vit_cfg = vit_config_from_run(cfg)
    restored = restore_fixed_tables(enc, vit_cfg, notes["low_precision"])

    # The encoder must load into the architecture the config names, with nothing left over.
    check = VisionTransformer(vit_cfg)
    result = check.load_state_dict(enc, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(f"checkpoint encoder does not match config.yaml's model: missing {result.missing_keys}, "
                          f"unexpected {result.unexpected_keys}")
    enc = {k: v.contiguous() for k, v in enc.items()}

    out = Path(out_dir) if out_dir is not None else run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    data = cfg.get("data") or {}
    tag_step = _STEP_TAG.match(tag_dir.name)
    meta = encoder_meta(
        vit_cfg, pixel_norm(data.get("mean"), data.get("std"), data.get("image_size", vit_cfg.img_size),
                            data.get("interpolation")),
        **run_export_meta(client, tag_dir),
        step=int(client.get("step", tag_step.group(1) if tag_step else 0)),
        samples_seen=client.get("samples", client.get("samples_seen")),
        shards=shard_list_hash(str(data.get("shards", ""))),
        source={"checkpoint": str(tag_dir), "zero_stage": notes["zero_stage"], "world_size": notes["world_size"],
                "not_fp32_in_checkpoint": [n for n in notes["low_precision"]],
                "restored_from_architecture": restored})
    if timm:  # before write_export: its mimkit.json, written last, names this file
        spec = timm_spec(vit_cfg)
        meta["timm"] = dict(spec, file="timm_model.safetensors")
        write_weights(out / "timm_model.safetensors", to_timm_state(enc, spec))
    return write_export(out, enc, meta)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mimkit export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="runs/NAME (holds config.yaml and checkpoints/)")
    parser.add_argument("--step", type=int, default=None, help="export this step (default: latest)")
    parser.add_argument("--timm", action="store_true", help="also write timm_model.safetensors")
    parser.add_argument("--out", default=None, help="export folder (default: RUN/export)")
    parser.add_argument("--universal", action="store_true",
                        help="export the checkpoint's universal form (checkpoints/universal/, written by a resume on "
                             "another world size or ZeRO stage)")
    args = parser.parse_args(argv)
    out = export_run(args.run_dir, args.step, timm=args.timm, out_dir=args.out, universal=args.universal)  # ExportError: mimkit.cli's one line
    meta = read_export_meta(out)
    print(f"exported step {meta['step']} of {args.run_dir} -> {out} "
          f"(ZeRO-{meta['source']['zero_stage']}, {meta['source']['world_size']} ranks)")
    return 0
