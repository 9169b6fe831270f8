"""Load encoder weights into a `VisionTransformer` from a mimkit export or a public layout.

Layouts: mimkit export, official BEiT / BEiT v2, MAE, MILAN, timm ViT, timm BEiT. Wrappers
("model" / "module" / "state_dict") and prefixes (module., backbone., encoder., model.) are
removed, names mapped to ours, a shared rel-pos table expanded to every block, rel-pos tables and
absolute position embeddings resized to the target grid, pretraining heads and mismatched
classifier heads dropped, and everything done is returned in a `LoadReport`.

Weights are read with safetensors or `torch.load(weights_only=True)`: a pickle that carries code
is refused.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from safetensors.torch import load_file

from mimkit.checkpoint.export_format import WEIGHTS_FILE, read_export_meta, read_pixel_norm, vit_config_from_export
from mimkit.checkpoint.safe_load import UnsafeCheckpointFile, refusal_reason
from mimkit.checkpoint.timm_layout import from_beit_names
from mimkit.errors import BadValue, MissingPath
from mimkit.models.pos_embed import resize_abs_pos_embed, resize_rel_pos_table, window_from_table_rows
from mimkit.models.vit import VisionTransformer

LAYOUTS = ("mimkit", "beit", "beitv2", "mae", "milan", "timm_vit", "timm_beit")
WRAPPER_KEYS = ("model", "module", "state_dict", "model_state")
PREFIXES = ("module.", "backbone.", "encoder.", "model.")
# Pretraining-only parts of public checkpoints: never part of a fine-tuned encoder.
PRETRAIN_ONLY = ("decoder_", "decoder.", "lm_head.", "cls_pt_layers.", "teacher.", "target_")
SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
_BLOCK = re.compile(r"^blocks\.(\d+)\.")

State = Dict[str, torch.Tensor]
# Heads of the public ViT widths whose head size is not 64 (ViT-H, -g, -G: 16 heads); others: width / 64.
HEADS_BY_WIDTH = {1280: 16, 1408: 16, 1664: 16}


class ArchitectureMismatch(BadValue):
    """A checkpoint whose encoder shapes differ from the network it is loaded into."""


@dataclass
class LoadReport:
    layout: str
    missing: List[str] = field(default_factory=list)  # target parameters left at their init
    unexpected: List[str] = field(default_factory=list)  # checkpoint keys the target has no place for
    resized: Dict[str, str] = field(default_factory=dict)  # name -> "old shape -> new shape"
    dropped: Dict[str, str] = field(default_factory=dict)  # name -> why it was not loaded
    converted: List[str] = field(default_factory=list)  # layout conversions applied
    architecture: str = ""  # what the loader inferred of the network (a checkpoint without mimkit.json)

    def summary(self) -> str:
        """One line: the layout, what was inferred, and counts (str() lists every key)."""
        parts = [f"layout {self.layout}"] + ([self.architecture] if self.architecture else [])
        parts.append(f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.resized)} resized, "
                     f"{len(self.dropped)} dropped, {len(self.converted)} converted")
        return "; ".join(parts)

    def __str__(self) -> str:
        lines = [f"checkpoint layout: {self.layout}"] + ([f"  inferred: {self.architecture}"] if self.architecture else [])
        lines += [f"  converted: {c}" for c in self.converted]
        lines += [f"  resized: {k} {v}" for k, v in self.resized.items()]
        lines += [f"  dropped: {k} ({v})" for k, v in self.dropped.items()]
        lines.append(f"  missing ({len(self.missing)}): {', '.join(self.missing) or '-'}")
        lines.append(f"  unexpected ({len(self.unexpected)}): {', '.join(self.unexpected) or '-'}")
        return "\n".join(lines)


# ---- reading files ------------------------------------------------------------------------------
def load_state(path: Union[str, os.PathLike]) -> Any:
    """Read a checkpoint: an export folder (model.safetensors), a .safetensors file, or a torch file
    read with weights_only=True. Returns what the file holds (a state dict, or a wrapper dict)."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise MissingPath(f"{path}: no such file (expected an export folder, a .safetensors file or a torch "
                          "checkpoint)")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    # Official BEiT / MAE checkpoints keep their argparse Namespace beside the weights: a plain
    # data holder, the only class allowed besides what weights_only permits by itself.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointFile(f"{path}: refused to unpickle (weights_only=True allows tensors and plain "
                                   "containers only; convert it to safetensors if you trust it): "
                                   f"{refusal_reason(err)}") from err


def unwrap_state(obj: Any) -> Tuple[State, Optional[str]]:
    """(flat tensor dict, the wrapper key it came from or None)."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state dict, got {type(obj).__name__}")
    for key in WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}, key
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, None


def strip_prefixes(state: State) -> Tuple[State, Dict[str, str]]:
    """Remove module. / backbone. / encoder. / model. where the encoder sits under them; keys outside
    that prefix (a pretraining head beside `encoder.`) are returned as dropped."""
    def holds_encoder(key: str) -> bool:  # blocks. / patch_embed. under any chain of prefixes
        while key.startswith(PREFIXES):
            key = key.split(".", 1)[1]
        return key.startswith(("blocks.", "patch_embed."))

    dropped: Dict[str, str] = {}
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if any(k.startswith(prefix) and holds_encoder(k[len(prefix):]) for k in state):
                inside = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                dropped.update({k: f"outside '{prefix}'" for k in state if not k.startswith(prefix)})
                state, changed = inside, True
    return state, dropped


# ---- layouts ------------------------------------------------------------------------------------
def detect_layout(state: Any) -> str:
    """Name the layout of a checkpoint (wrapped or flat): one of LAYOUTS."""
    flat, wrapper = unwrap_state(state)
    flat, _ = strip_prefixes(flat)
    return _layout_of(flat, wrapper)


def _layout_of(flat: State, wrapper: Optional[str]) -> str:
    keys = list(flat)
    has = lambda pred: any(pred(k) for k in keys)  # noqa: E731
    if has(lambda k: k.startswith("cls_pt_layers.")):
        return "beitv2"
    if has(lambda k: k.startswith("decoder_")):
        # MILAN's prompting decoder splits attention into q and kv projections; MAE's has qkv.
        return "milan" if has(lambda k: k.startswith("decoder_blocks.") and ".attn.kv." in k) else "mae"
    beit_names = has(lambda k: re.search(r"\.gamma_[12]$", k) is not None) or has(
        lambda k: k.endswith("relative_position_index"))
    if beit_names:
        official = wrapper in ("model", "module") or has(lambda k: k.startswith(("lm_head.", "mask_token"))) \
            or has(lambda k: k.endswith("relative_position_index"))
        return "beit" if official else "timm_beit"
    if has(lambda k: k.endswith(("attn.q_bias", "relative_position_bias_table")) or k == "mask_token"):
        return "mimkit"
    return "timm_vit"  # timm ViT, MAE fine-tuned, and plain mimkit exports share these names


# ---- architecture check -------------------------------------------------------------------------
def _depth(state: State) -> int:
    ids = [int(m.group(1)) for k in state if (m := _BLOCK.match(k))]
    return max(ids) + 1 if ids else 0


def check_architecture(model: VisionTransformer, state: State) -> None:
    """Raise ValueError naming every difference between the checkpoint's encoder and the model's."""
    cfg, diffs = model.cfg, []
    proj = state.get("patch_embed.proj.weight")
    if proj is None:
        raise ArchitectureMismatch("checkpoint has no patch_embed.proj.weight: not a ViT encoder state dict")
    d, c, p = proj.shape[0], proj.shape[1], proj.shape[2]
    for name, ours, theirs in (("embed_dim", cfg.embed_dim, d), ("in_chans", cfg.in_chans, c),
                               ("patch_size", cfg.patch_size, p), ("depth", cfg.depth, _depth(state))):
        if ours != theirs:
            diffs.append(f"{name}: checkpoint {theirs}, model {ours}")
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None and fc1.shape[0] != int(cfg.embed_dim * cfg.mlp_ratio):
        diffs.append(f"mlp hidden size: checkpoint {fc1.shape[0]}, model {int(cfg.embed_dim * cfg.mlp_ratio)}")
    tables = [v for k, v in state.items() if k.endswith("relative_position_bias_table")]
    if tables and tables[0].shape[1] != cfg.num_heads:
        diffs.append(f"num_heads: checkpoint {tables[0].shape[1]}, model {cfg.num_heads}")
    if diffs:
        raise ArchitectureMismatch("checkpoint does not match the model architecture: " + "; ".join(diffs))


def encoder_state(state: Any) -> State:
    """The encoder's tensors under mimkit names, from what `load_state` returns (any layout)."""
    flat, _ = unwrap_state(state)
    flat, _ = strip_prefixes(flat)
    return from_beit_names(flat)


def infer_architecture(state: Any) -> Tuple[Dict[str, Any], List[str]]:
    """(the ViTConfig fields a checkpoint's shapes tell, the fields they cannot). Told: width, input channels,
    patch size, depth, MLP ratio, class token, absolute / relative position tables and the grid (img_size)
    they hold, q/v or qkv biases, LayerScale, and heads where a relative-position table (a column per head)
    exists. Not told: heads otherwise (attention splits one matrix), which the caller sets."""
    flat = encoder_state(state)
    proj = flat.get("patch_embed.proj.weight")
    if proj is None or proj.dim() != 4:
        raise ArchitectureMismatch("checkpoint has no patch_embed.proj.weight [D, C, p, p]: not a ViT encoder")
    width, patch = proj.shape[0], proj.shape[2]
    arch: Dict[str, Any] = dict(embed_dim=width, in_chans=proj.shape[1], patch_size=patch, depth=_depth(flat),
                                class_token="cls_token" in flat)
    fc1 = flat.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        arch["mlp_ratio"] = fc1.shape[0] / width
    grid = None
    if "pos_embed" in flat:
        rows = flat["pos_embed"].shape[1]
        side = _square_grid(rows) or _square_grid(rows - 1)
        arch["pos_embed"], grid = "learned", side[0] if side else None
    else:
        arch["pos_embed"] = "none"
    per_block = "blocks.0.attn.relative_position_bias_table"
    table = flat.get(per_block, flat.get(SHARED_TABLE))
    arch["rel_pos"] = "block" if per_block in flat else "shared" if SHARED_TABLE in flat else "none"
    unknown = []
    if table is not None:
        arch["num_heads"] = table.shape[1]
        grid = grid or window_from_table_rows(table.shape[0])[0]
    else:
        unknown.append("num_heads")
    if grid:
        arch["img_size"] = grid * patch
    arch["qkv_bias"] = ("qv" if "blocks.0.attn.q_bias" in flat else "qkv" if "blocks.0.attn.qkv.bias" in flat
                        else "none")
    arch["layer_scale_init"] = 0.1 if "blocks.0.ls1.gamma" in flat else None  # the loaded gammas replace it
    return arch, unknown


def default_heads(width: int) -> int:
    """Heads of a public ViT of this width (head size 64, or ViT-H's 16)."""
    return HEADS_BY_WIDTH.get(width, max(1, width // 64))


# ---- conversions --------------------------------------------------------------------------------
def convert_qkv_bias(model: VisionTransformer, state: State, report: LoadReport) -> None:
    """Between qkv.bias and q_bias / v_bias. Dropping a k bias is exact: it adds q.b_k to every
    logit of a query, which softmax ignores."""
    target = model.cfg.qkv_bias
    for i in range(len(model.blocks)):
        pre = f"blocks.{i}.attn."
        if target == "qkv" and pre + "q_bias" in state and pre + "v_bias" in state:
            q, v = state.pop(pre + "q_bias"), state.pop(pre + "v_bias")
            state[pre + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
            if i == 0:
                report.converted.append("q_bias / v_bias -> qkv.bias (k bias 0)")
        elif target == "qv" and pre + "qkv.bias" in state:
            q, _, v = state.pop(pre + "qkv.bias").chunk(3)
            state[pre + "q_bias"], state[pre + "v_bias"] = q, v
            if i == 0:
                report.converted.append("qkv.bias -> q_bias / v_bias (k bias dropped: softmax-invariant)")


def expand_shared_rel_pos(model: VisionTransformer, state: State, report: LoadReport) -> None:
    """A shared table (BEiT pretraining) becomes every block's own table when the target is per-block."""
    if model.cfg.rel_pos != "block" or SHARED_TABLE not in state:
        return
    shared = state.pop(SHARED_TABLE)
    for i in range(len(model.blocks)):
        state[f"blocks.{i}.attn.relative_position_bias_table"] = shared.clone()
    report.converted.append(f"shared rel-pos table expanded to {len(model.blocks)} blocks")


def resize_rel_pos_tables(model: VisionTransformer, state: State, report: LoadReport) -> None:
    """Resize every rel-pos table whose window differs from the target module's."""
    for name, module in model.named_modules():
        window = getattr(module, "rel_pos_window", None) or getattr(module, "window", None)
        target = getattr(module, "relative_position_bias_table", None)
        key = f"{name}.relative_position_bias_table"
        if not isinstance(target, torch.Tensor) or key not in state or state[key].shape == target.shape:
            continue
        old = state[key]
        state[key] = resize_rel_pos_table(old, window_from_table_rows(old.shape[0]), window)
        report.resized[key] = f"{tuple(old.shape)} -> {tuple(state[key].shape)}"


def _square_grid(n: int) -> Optional[Tuple[int, int]]:
    side = math.isqrt(n)
    return (side, side) if side * side == n else None


def resize_pos_embed(model: VisionTransformer, state: State, report: LoadReport) -> None:
    """Fit the checkpoint's absolute position table to the target grid and prefix count."""
    if "pos_embed" not in state:
        return
    if model.pos_embed is None:
        report.dropped["pos_embed"] = "target has no absolute position embedding"
        state.pop("pos_embed")
        return
    if model.cfg.pos_embed == "sincos":
        # Computed for the target grid; a saved copy may have been rounded by bf16 training.
        report.dropped["pos_embed"] = f"target keeps its fixed sin-cos table for grid {model.grid_size}"
        state.pop("pos_embed")
        return
    src, tgt = state["pos_embed"], model.pos_embed
    if src.shape == tgt.shape:
        return
    n = src.shape[1]
    src_prefix = 0 if _square_grid(n) else 1
    old_grid = _square_grid(n - src_prefix)
    if old_grid is None:
        raise ValueError(f"pos_embed of {n} rows is not a square grid with 0 or 1 prefix rows")
    resized = resize_abs_pos_embed(src, old_grid, model.grid_size, src_prefix)
    P = model.num_prefix_tokens
    if src_prefix > P:
        resized = resized[:, src_prefix - P:]  # target has no cls token: drop its position
    elif src_prefix < P:
        resized = torch.cat([resized.new_zeros(1, P - src_prefix, resized.shape[-1]), resized], dim=1)
    state["pos_embed"] = resized
    report.resized["pos_embed"] = f"{tuple(src.shape)} -> {tuple(resized.shape)}"


def drop_unusable(model: VisionTransformer, state: State, report: LoadReport) -> None:
    """Pretraining heads, a mask token the target lacks, a final norm the target replaced by fc_norm,
    and a classifier head of another shape."""
    target = model.state_dict()
    for key in list(state):
        reason = None
        if key.startswith(PRETRAIN_ONLY):
            reason = "pretraining-only"
        elif key == "mask_token" and (report.layout in ("mae", "milan") or key not in target):
            reason = "mask token of the pretraining model"
        elif key == "cls_token" and key not in target:
            reason = "target has no class token"
        elif key.startswith("norm.") and isinstance(model.norm, torch.nn.Identity):
            reason = "target pools then normalises (fc_norm): no final norm"
        elif key.startswith("head.") and (key not in target or target[key].shape != state[key].shape):
            reason = "classifier head of another shape"
        if reason:
            report.dropped[key] = reason
            state.pop(key)


def load_into_vit(model: VisionTransformer, state: Any, layout: Optional[str] = None,
                  verbose: bool = True) -> LoadReport:
    """Load a checkpoint (as `load_state` returns it) into `model` in place; return the report.

    Raises ValueError when the encoder's architecture differs (embed_dim, depth, patch size, ...).
    """
    flat, wrapper = unwrap_state(state)
    flat, outside = strip_prefixes(flat)
    layout = layout or _layout_of(flat, wrapper)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")
    report = LoadReport(layout=layout, dropped=dict(outside))
    flat = from_beit_names(flat)  # gamma_1 -> ls1.gamma; index buffers dropped (any layout)
    check_architecture(model, flat)
    drop_unusable(model, flat, report)
    convert_qkv_bias(model, flat, report)
    expand_shared_rel_pos(model, flat, report)
    resize_rel_pos_tables(model, flat, report)
    resize_pos_embed(model, flat, report)

    target = model.state_dict()
    wrong = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(target[k].shape)}"
             for k, v in flat.items() if k in target and target[k].shape != v.shape]
    if wrong:
        raise ArchitectureMismatch("checkpoint does not match the model architecture: " + "; ".join(wrong))
    result = model.load_state_dict(flat, strict=False)
    fixed = {"pos_embed"} if model.cfg.pos_embed == "sincos" else set()  # computed, nothing to load
    report.missing = [k for k in result.missing_keys if k not in fixed]
    report.unexpected = list(result.unexpected_keys)
    if verbose:
        print(report)
    return report


def load_checkpoint_into_vit(model: VisionTransformer, path: Union[str, os.PathLike],
                             verbose: bool = True) -> LoadReport:
    """`load_into_vit(model, load_state(path))`."""
    return load_into_vit(model, load_state(path), verbose=verbose)


# ---- mimkit exports -----------------------------------------------------------------------------
def load_vit_export(export_dir: Union[str, os.PathLike], verbose: bool = False,
                    **overrides: Any) -> Tuple[VisionTransformer, Dict[str, Any]]:
    """(encoder built from mimkit.json's architecture with `overrides` and loaded, info) where info holds
    the pixel normalisation ("mean", "std", "image_size", "interpolation"), "meta" and "report"."""
    meta = read_export_meta(export_dir)
    model = VisionTransformer(vit_config_from_export(meta, **overrides))
    report = load_into_vit(model, load_state(export_dir), layout="mimkit", verbose=verbose)
    info = {**read_pixel_norm(meta, model.cfg.img_size, where=export_dir), "meta": meta, "report": report}
    return model, info
