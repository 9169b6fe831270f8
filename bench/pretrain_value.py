"""Does pretraining help? The whole demo chain at one seed: pretrained vs from-scratch top-1 on 10% of the labels.

    python bench/pretrain_value.py [--seed 0] [--out /tmp/pretrain_value] [--min-margin 0] [demo options ...]

Runs `mimkit demo --fresh --seed S` (demo data, dVAE tokenizer, BEiT (+ MILAN) pretraining, then fine-tuning of the
pretrained encoder and of a from-scratch one with the same architecture, data, seed and steps), then
prints one JSON object: the seed, both top-1 (and best-epoch top-1), the margin in points, the demo's wall
time per stage, the machine (and the linear-probe top-1 of both). Exits non-zero unless pretrained top-1 beats scratch by more than
--min-margin points. Any other option is passed to `mimkit demo` (e.g. --pretrain-steps 600).
Expect about as long as `mimkit demo` (minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pretrain_value", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="demo run root (default: /tmp/pretrain_value_seedS)")
    parser.add_argument("--min-margin", type=float, default=0.0, help="required top-1 lead of pretrained, in points")
    args, demo_args = parser.parse_known_args(argv)
    out = Path(args.out or f"/tmp/pretrain_value_seed{args.seed}")

    from mimkit.demo import DEFAULTS
    from mimkit.demo import main as demo_main

    start = time.time()
    demo_main(["--out", str(out), "--fresh", "--seed", str(args.seed), *demo_args])
    wall = time.time() - start
    rows = json.loads((out / "finetune_comparison.json").read_text())
    pre, scratch = rows["pretrained"], rows["scratch"]
    margin = pre["top1"] - scratch["top1"]
    result = {
        "seed": args.seed,
        "pretrained_top1": pre["top1"], "scratch_top1": scratch["top1"], "margin": round(margin, 2),
        "pretrained_best_top1": pre["best_top1"], "scratch_best_top1": scratch["best_top1"],
        **({"pretrained_linprobe_top1": rows["pretrained_linprobe"]["top1"],
            "scratch_linprobe_top1": rows["scratch_linprobe"]["top1"]} if "pretrained_linprobe" in rows else {}),
        "train_labels": pre["train_images"], "val_images": pre["count"], "finetune_steps": pre["steps"],
        "demo_args": demo_args, "defaults": DEFAULTS, "wall_s": round(wall, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "out": str(out),
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    if margin <= args.min_margin:
        print(f"pretrain_value: pretrained {pre['top1']:.1f} does not beat scratch {scratch['top1']:.1f} "
              f"by more than {args.min_margin} points", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
