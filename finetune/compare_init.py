"""Pretrained vs from scratch with the same budget: `python -m mimkit.finetune.compare_init --init EXPORT
--config configs/finetune/tiny_cpu.yaml [dotted.key=value ...]` fine-tunes twice (model.init=EXPORT, then
none), with the same data, seed and steps, and prints a small table (also RUN_ROOT/comparison.json).

When EXPORT is a mimkit export, the scratch run builds exactly the export's architecture (its mimkit.json:
patch size, width, depth, position scheme, ...) and uses its pixel normalisation, with fresh weights, so
the two runs are the same network by construction; `model.preset` only matters for foreign checkpoints.
`--linprobe` adds the MAE protocol too: a linear probe on the frozen pretrained encoder vs on a frozen
random one (mode=linprobe, optim.layer_decay ignored)."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Iterator, Optional

import mimkit.finetune.classification as classification
from mimkit.checkpoint.load import read_export_meta, vit_config_from_export
from mimkit.config import load_config
from mimkit.finetune.config import FinetuneConfig
from mimkit.finetune.trainer import train


def scratch_meta(init: str) -> Optional[dict]:
    """The export's mimkit.json (architecture, pixel_norm) for the scratch arm, or None for foreign files."""
    path = Path(init)
    folder = path if path.is_dir() else path.parent
    try:
        meta = read_export_meta(folder)
    except FileNotFoundError:
        return None
    vit_config_from_export(meta)  # fail here, not mid-comparison, on an architecture the ViT cannot build
    return {"architecture": meta["architecture"], "pixel_norm": meta.get("pixel_norm") or {}}


@contextlib.contextmanager
def scratch_architecture(meta: Optional[dict]) -> Iterator[None]:
    """While active, a run with model.init="" is built from `meta` (fresh weights) instead of model.preset."""
    if meta is None:
        yield
        return
    original = classification.export_meta
    classification.export_meta = lambda init: original(init) if init else meta
    try:
        yield
    finally:
        classification.export_meta = original


def compare(init: str, config: str, overrides: list[str], modes: tuple[str, ...] = ("finetune",)) -> dict:
    rows = {}
    meta = scratch_meta(init)
    for mode in modes:
        suffix = "" if mode == "finetune" else f"_{mode}"
        for name, value in (("pretrained", init), ("scratch", "")):
            cfg = load_config(FinetuneConfig, config, [*overrides, "run.resume=none"])
            cfg.mode = mode
            cfg.model.init = value
            cfg.run.name = f"{cfg.run.name}_{name}{suffix}"
            with scratch_architecture(meta):
                rows[name + suffix] = train(cfg)
    return rows


def format_table(rows: dict) -> str:
    any_row = next(iter(rows.values()))
    lines = [f"fine-tuning on {any_row['train_images']} labelled images, {any_row['steps']} steps each",
             f"{'init':<20}{'top-1':>8}{'top-5':>8}", "-" * 36]
    lines += [f"{name:<20}{r['top1']:>8.1f}{r['top5']:>8.1f}" for name, r in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compare_init", description=__doc__.splitlines()[0])
    parser.add_argument("--init", required=True, help="the pretrained export (or any layout the loader reads)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--linprobe", action="store_true",
                        help="also compare linear probes (frozen pretrained vs frozen random encoder)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)  # flags may follow the overrides
    modes = ("finetune", "linprobe") if args.linprobe else ("finetune",)
    rows = compare(args.init, args.config, args.overrides, modes)
    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    out = Path(cfg.run.root) / f"{cfg.run.name}_comparison.json"
    out.write_text(json.dumps(rows, indent=2))
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
