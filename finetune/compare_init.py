"""Pretrained vs from scratch with the same budget: `python -m mimkit.finetune.compare_init --init EXPORT
--config configs/finetune/tiny_cpu.yaml [dotted.key=value ...]` fine-tunes twice (model.init=EXPORT, then
none), with the same data, seed and steps, and prints a small table (also RUN_ROOT/comparison.json)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mimkit.config import load_config
from mimkit.finetune.config import FinetuneConfig
from mimkit.finetune.trainer import train


def compare(init: str, config: str, overrides: list[str]) -> dict:
    rows = {}
    for name, value in (("pretrained", init), ("scratch", "")):
        cfg = load_config(FinetuneConfig, config, [*overrides, "run.resume=none"])
        cfg.model.init = value
        cfg.run.name = f"{cfg.run.name}_{name}"
        rows[name] = train(cfg)
    return rows


def format_table(rows: dict) -> str:
    any_row = next(iter(rows.values()))
    lines = [f"fine-tuning on {any_row['train_images']} labelled images, {any_row['steps']} steps each",
             f"{'init':<12}{'top-1':>8}{'top-5':>8}", "-" * 28]
    lines += [f"{name:<12}{r['top1']:>8.1f}{r['top5']:>8.1f}" for name, r in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compare_init", description=__doc__.splitlines()[0])
    parser.add_argument("--init", required=True, help="the pretrained export (or any layout the loader reads)")
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    rows = compare(args.init, args.config, args.overrides)
    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    out = Path(cfg.run.root) / f"{cfg.run.name}_comparison.json"
    out.write_text(json.dumps(rows, indent=2))
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
