"""Pretrained vs from scratch with the same budget:

    python -m mimkit.finetune.compare_init --init [NAME=]EXPORT [--init NAME=EXPORT ...] --config CONFIG
        [--seeds 0 1 2] [--lrs 1e-3 3e-3] [--linprobe] [dotted.key=value ...]

fine-tunes every init and a from-scratch network with the same data, steps and recipe, for each seed (the
seed also draws the labelled subset under data.label_fraction) and each lr, then prints a table (mean and
spread over seeds, the lead over scratch) and writes RUN_ROOT/RUN_NAME_comparison.json.

Scratch is the same network by construction: when an init is a mimkit export, its scratch arm is built from
the export's mimkit.json (patch size, width, depth, position scheme, ...) and pixel normalisation with fresh
weights; exports whose fine-tuning networks are identical (e.g. MAE and MILAN) share one scratch arm.
`model.preset` only serves foreign checkpoints. With several lrs, each arm is scored at its own best lr
(mean over seeds), so scratch is not held to a recipe tuned for pretrained weights (the lr is picked on the
val set it reports, alike for every arm: a comparison, not a held-out accuracy). `--linprobe` adds the
MAE protocol: a linear probe on the frozen pretrained encoder vs on a frozen random one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path
from typing import Iterator, Optional

import mimkit.finetune.encoder as encoder
from mimkit.checkpoint.export_format import read_export_meta, vit_config_from_export
from mimkit.config import help_text
from mimkit.finetune.config import FinetuneConfig, load_finetune_config
from mimkit.finetune.trainer import train
from mimkit.runlog import PROGRESS_ENV


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
    original = encoder.export_meta
    encoder.export_meta = lambda init: original(init) if init else meta
    try:
        yield
    finally:
        encoder.export_meta = original


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Each run says one line (above) instead of its progress and evaluations, unless MIMKIT_PROGRESS is set."""
    if os.environ.get(PROGRESS_ENV):
        yield
        return
    os.environ[PROGRESS_ENV] = "off"
    try:
        yield
    finally:
        os.environ.pop(PROGRESS_ENV, None)


def parse_inits(specs: list[str]) -> dict[str, str]:
    """["beit=runs/x/export", "runs/y/export"] -> {"beit": ..., "pretrained": ...}; names must be unique."""
    inits: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = (name, path) if sep else ("pretrained" if len(specs) == 1 else Path(spec).parent.name, spec)
        if not name or name.startswith("scratch") or name in inits:
            raise SystemExit(f"compare_init: --init {spec!r}: give each init a unique NAME=PATH (not 'scratch...')")
        inits[name] = path
    return inits


def scratch_arms(inits: dict[str, str], cfg: FinetuneConfig) -> tuple[dict[str, Optional[dict]], dict[str, str]]:
    """One scratch arm per distinct fine-tuning network: ({arm: meta}, {init name: its scratch arm})."""
    arms: dict[str, Optional[dict]] = {}
    network_to_arm: dict[str, str] = {}
    arm_of: dict[str, str] = {}
    for name, path in inits.items():
        meta = scratch_meta(path)
        network = json.dumps([dataclasses.asdict(encoder.encoder_config(cfg, meta)),
                              (meta or {}).get("pixel_norm")], sort_keys=True)
        if network not in network_to_arm:
            network_to_arm[network] = f"scratch_{name}"
            arms[f"scratch_{name}"] = meta
        arm_of[name] = network_to_arm[network]
    if len(arms) == 1:  # one network for all: plain "scratch"
        only = next(iter(arms))
        arms = {"scratch": arms[only]}
        arm_of = {name: "scratch" for name in arm_of}
    return arms, arm_of


# Run facts, not metrics: never averaged into a row.
RUN_KEYS = ("count", "train_images", "steps", "epochs", "num_processes")


def summarise(runs: list[dict]) -> dict:
    """Mean over seeds of every metric (the task's primary, `metric`: top1, mIoU, bbox_AP, ..., with its spread
    and per-seed values) and the run facts."""
    m = runs[0].get("primary", "top1")
    values = [r[m] for r in runs]
    out = {"metric": m, m: round(statistics.fmean(values), 2), f"{m}_std": round(statistics.pstdev(values), 2),
           f"{m}_runs": values, f"best_{m}_runs": [r[f"best_{m}"] for r in runs]}
    for name, value in runs[0].items():
        if name not in out and name not in RUN_KEYS and not name.startswith("best_") \
                and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = round(statistics.fmean(r[name] for r in runs), 2)
    return out | {name: runs[0][name] for name in RUN_KEYS if name in runs[0]}


def compare(inits: dict[str, str], config: str, overrides: list[str], modes: tuple[str, ...] = ("finetune",),
            seeds: tuple[int, ...] = (0,), lrs: tuple[Optional[float], ...] = (None,)) -> dict:
    """{row name: summary} for every init and scratch arm (and mode); rows carry `vs` (their scratch arm),
    `lead` (points over it) and, with several lrs, `lr` (the best one) and `by_lr`."""
    base = load_finetune_config(config, overrides)
    arms, arm_of = scratch_arms(inits, base)
    jobs = {name: (path, None) for name, path in inits.items()} | {arm: ("", meta) for arm, meta in arms.items()}
    rows = {}
    for mode in modes:
        suffix = "" if mode == "finetune" else f"_{mode}"
        for name, (init, meta) in jobs.items():
            by_lr = {}
            for lr in lrs:
                runs = []
                for seed in seeds:
                    cfg = load_finetune_config(config, [*overrides, "run.resume=none"])
                    cfg.mode, cfg.model.init, cfg.run.seed = mode, init, seed
                    if lr is not None:
                        cfg.optim.lr = lr
                    tag = "".join([suffix, f"_lr{lr:g}" if len(lrs) > 1 else "", f"_s{seed}" if len(seeds) > 1 else ""])
                    cfg.run.name = f"{base.run.name}_{name}{tag}"
                    start = time.time()
                    with scratch_architecture(meta), quiet_progress():
                        runs.append(train(cfg))
                    result = runs[-1]
                    m = result.get("primary", "top1")
                    print(f"{cfg.run.name}: {m} {result[m]:.1f} (best {result[f'best_{m}']:.1f}), "
                          f"{result['steps']} steps, {time.time() - start:.0f}s", flush=True)
                by_lr[lr] = summarise(runs)
            m = next(iter(by_lr.values()))["metric"]
            best_lr = max(by_lr, key=lambda lr: by_lr[lr][m])
            row = dict(by_lr[best_lr])
            if len(lrs) > 1:
                row["lr"] = best_lr
                row["by_lr"] = {f"{lr:g}": {m: s[m], f"{m}_std": s[f"{m}_std"]} for lr, s in by_lr.items()}
            rows[name + suffix] = row
        for name in inits:
            row, ref = rows[name + suffix], rows[arm_of[name] + suffix]
            row["vs"], row["lead"] = arm_of[name] + suffix, round(row[row["metric"]] - ref[ref["metric"]], 2)
    return rows


HEADINGS = {"top1": "top-1", "bbox_AP": "box AP", "segm_AP": "mask AP"}


def format_table(rows: dict, title: str = "fine-tuning", columns: Optional[tuple[str, ...]] = None) -> str:
    """The comparison as text: each metric of `columns` (default: the primary) with its lead over scratch."""
    any_row = next(iter(rows.values()))
    m = any_row.get("metric", "top1")
    columns = tuple(columns or (m,))
    seeds = len(any_row[f"{m}_runs"])
    lines = [f"{title} on {any_row['train_images']} labelled images, {any_row['steps']} steps each, "
             f"{any_row['count']} val images, {seeds} seed(s)" + (" (mean +- sd)" if seeds > 1 else "")]
    head = "".join(f"{HEADINGS.get(c, c):>9}" + (f"{'+-':>6}" if c == m else "") + f"{'lead':>7}" for c in columns)
    lines += [f"{'init':<24}{head}{'lr':>9}", "-" * (33 + 16 * len(columns) + 6)]
    for name, r in rows.items():
        cells = ""
        for c in columns:
            lead = f"{r[c] - rows[r['vs']][c]:+.1f}" if "vs" in r else ""
            cells += f"{r[c]:>9.1f}" + (f"{r[f'{m}_std']:>6.1f}" if c == m else "") + f"{lead:>7}"
        lr = f"{r['lr']:g}" if "lr" in r else ""
        lines.append(f"{name:<24}{cells}{lr:>9}")
    names = ", ".join(HEADINGS.get(c, c) for c in columns)
    lines.append(f"lead: {names} points over the same network trained from scratch with the same budget")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compare_init", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__ + "\nconfig keys (the finetune stage's), as key=value overrides:\n\n"
                                     + help_text(FinetuneConfig))
    parser.add_argument("--init", action="append", required=True,
                        help="[NAME=]PATH of a pretrained export (or any layout the loader reads); repeatable")
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="fine-tuning seeds (each also draws the labelled subset); default: run.seed")
    parser.add_argument("--lrs", type=float, nargs="+", default=None,
                        help="peak lrs to try; each arm is scored at its best (default: optim.lr)")
    parser.add_argument("--linprobe", action="store_true",
                        help="also compare linear probes (frozen pretrained vs frozen random encoder)")
    parser.add_argument("--no-table", action="store_true", help="write the JSON only (the caller prints the table)")
    parser.add_argument("--columns", nargs="+", default=None,
                        help="metrics to tabulate with their leads (default: the task's primary, e.g. top1)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)  # flags may follow the overrides
    cfg = load_finetune_config(args.config, args.overrides)
    modes = ("finetune", "linprobe") if args.linprobe else ("finetune",)
    rows = compare(parse_inits(args.init), args.config, args.overrides, modes,
                   tuple(args.seeds or [cfg.run.seed]), tuple(args.lrs or [None]))
    out = Path(cfg.run.root) / f"{cfg.run.name}_comparison.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    if not args.no_table:
        title = "fine-tuning" if cfg.task == "classification" else f"{cfg.task} fine-tuning"
        print(format_table(rows, title, args.columns))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
