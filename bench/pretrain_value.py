"""Does pretraining help? Every demo export vs scratch on 10% of the labels, over seeds and lrs.

    python bench/pretrain_value.py [--out DIR] [--seeds 0 1 2] [--lrs 1e-3 2e-3 3e-3] [--check mae]
                                   [--min-margin 2] [--fresh] [demo options ...]

Runs `mimkit demo` into DIR unless its exports are already there (`--fresh` starts over): demo data, dVAE
tokenizer, BEiT, MAE and MILAN pretraining. Then fine-tunes each export and a from-scratch network of the
same architecture (`mimkit.finetune.compare_init`) on the demo's 10 % labelled subset for every seed (the
seed also draws the subset) and every lr. Each arm is scored at its own best lr (mean over seeds), so
scratch is not held to the pretrained arm's recipe. Prints one JSON object (rows, leads, the demo's wall
time, the machine) and exits non-zero unless the `--check` export leads its scratch arm by more than
`--min-margin` points. Expect the demo's time plus about a minute per arm per lr on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pretrain_value", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/pretrain_value", help="demo run root (default: /tmp/pretrain_value)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 2e-3, 3e-3], help="fine-tuning peak lrs")
    parser.add_argument("--check", default="mae", help="the export whose lead decides the exit status")
    parser.add_argument("--min-margin", type=float, default=2.0, help="required lead of --check, in top-1 points")
    parser.add_argument("--fresh", action="store_true", help="re-run the demo even if its exports exist")
    args, demo_args = parser.parse_known_args(argv)
    out = Path(args.out).resolve()

    from mimkit.demo.chain import DEFAULTS, PRESETS
    from mimkit.demo.chain import main as demo_main

    start = time.time()
    names = ("mae", "beit", "milan")
    if args.fresh or not all((out / n / "export" / "mimkit.json").exists() for n in names):
        demo_main(["--out", str(out), *(["--fresh"] if args.fresh else []), *demo_args])
    demo_wall = time.time() - start
    inits = [f"--init={n}={out / n / 'export'}" for n in names if (out / n / "export" / "mimkit.json").exists()]
    data = out / "data" / "imagefolder"
    start = time.time()
    cmd = [sys.executable, "-m", "mimkit.finetune.compare_init", *inits, "--seeds", *map(str, args.seeds),
           "--lrs", *map(str, args.lrs), "--config", str(PRESETS["finetune"]), f"run.root={out}",
           "run.name=value", f"data.root={data}", "data.label_fraction=0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    subprocess.run(cmd, check=True, cwd=REPO, env=env)
    rows = json.loads((out / "value_comparison.json").read_text())
    result = {
        "rows": {name: {k: row[k] for k in ("top1", "top1_std", "top1_runs", "lr", "by_lr", "lead", "vs") if k in row}
                 for name, row in rows.items()},
        "check": args.check, "lead": rows[args.check]["lead"], "min_margin": args.min_margin,
        "seeds": args.seeds, "lrs": args.lrs, "train_labels": rows[args.check]["train_images"],
        "val_images": rows[args.check]["count"], "finetune_steps": rows[args.check]["steps"],
        "demo_args": demo_args, "defaults": DEFAULTS, "demo_wall_s": round(demo_wall, 1),
        "compare_wall_s": round(time.time() - start, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "out": str(out),
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    if result["lead"] <= args.min_margin:
        print(f"pretrain_value: {args.check} leads scratch by {result['lead']:+.1f} points, not more than "
              f"{args.min_margin}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
