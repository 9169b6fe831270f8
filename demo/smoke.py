"""`python -m mimkit.demo.smoke OUT`: what `scripts/gpu_smoke.sh` asserts after the demo chain ran into
OUT: every training stage logged losses and all of them are finite; every export loads with nothing
missing and gives finite outputs on one image; the fine-tuning tables exist. One line per check, exit 1
on the first failure."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from mimkit.checkpoint.export_format import is_export
from mimkit.checkpoint.load import load_vit_export
from mimkit.checkpoint.tokenizer_export import load_tokenizer
from mimkit.errors import UserError
from mimkit.runlog import read_metrics

PRETRAIN_RUNS = ("beit", "mae", "milan")


class SmokeFailure(RuntimeError):
    pass


def as_number(value) -> float | None:
    """A logged value as a float: numbers, and the strings the metrics log writes for nan / inf."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf"):
        return float(value)
    return None


def check_losses(run_dir: Path) -> str:
    """Every logged loss-like value of the run is finite, and there is at least one."""
    values = [(row.get("step"), key, as_number(value)) for row in read_metrics(run_dir) for key, value in row.items()
              if "loss" in key and as_number(value) is not None]
    if not values:
        raise SmokeFailure(f"{run_dir}: no losses logged")
    bad = [f"{key}={value} at step {step}" for step, key, value in values if not math.isfinite(value)]
    if bad:
        raise SmokeFailure(f"{run_dir}: non-finite losses: {', '.join(bad[:5])}")
    return f"{len(values)} losses finite"


def check_vit_export(export: Path) -> str:
    model, info = load_vit_export(export)
    if info["report"].missing:
        raise SmokeFailure(f"{export}: parameters missing from the export: {info['report'].missing[:5]}")
    size = info["image_size"]
    with torch.no_grad():
        out = model.forward_features(torch.rand(1, 3, *((size, size) if isinstance(size, int) else size)))
    if not torch.isfinite(out).all():
        raise SmokeFailure(f"{export}: non-finite features")
    return f"loads, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, finite features"


def check_tokenizer_export(export: Path) -> str:
    tokenizer = load_tokenizer(export)
    ids = tokenizer.tokenize(torch.rand(1, 3, *tokenizer.input_size))
    if not (0 <= int(ids.min()) and int(ids.max()) < tokenizer.vocab_size):
        raise SmokeFailure(f"{export}: token ids outside the vocabulary")
    return f"loads, {tokenizer.vocab_size} codes"


def check_demo(out: Path) -> list[str]:
    """The checks, in the chain's order; raises SmokeFailure on the first that fails."""
    lines = []
    tokenizer = out / "tokenizer"
    lines.append(f"tokenizer  {check_losses(tokenizer)}; export {check_tokenizer_export(tokenizer / 'export')}")
    for name in PRETRAIN_RUNS:
        run = out / name
        if not is_export(run / "export"):
            raise SmokeFailure(f"{run / 'export'}: no export")
        lines.append(f"{name:<10} {check_losses(run)}; export {check_vit_export(run / 'export')}")
    table = out / "finetune_comparison.json"
    if not table.is_file():
        raise SmokeFailure(f"{table}: no fine-tuning table")
    arms = json.loads(table.read_text())
    lines.append(f"finetune   {len(arms)} arms: {', '.join(sorted(arms))}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mimkit.demo.smoke", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the demo's run root (mimkit demo --out)")
    args = parser.parse_args(argv)
    try:
        for line in check_demo(args.out):
            print(f"smoke: {line}", flush=True)
    except (SmokeFailure, UserError) as failure:  # UserError: an export that is missing or refused
        print(f"smoke: FAILED: {failure}", file=sys.stderr)
        return 1
    print(f"smoke: OK ({args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
