"""`mimkit demo`: the whole chain on the embedded demo data, in about ten minutes on 2 CPU cores.

1. data       build the demo images (ImageFolder, tar shards, ADE20K-style, COCO) from pictures shipped
              inside scikit-image / scikit-learn;
2. tokenizer  train a tiny DALL-E dVAE on the shards (DeepSpeed ZeRO-2, 2 ranks) and export it;
3. pretrain   BEiT masked-token prediction with that tokenizer (DeepSpeed ZeRO-2, 2 ranks), exported;
4. pretrain   MAE (pixel targets, no tokenizer) on the same shards, exported;
5. pretrain   MILAN, the BEiT encoder standing in for CLIP as the teacher, exported;
6. finetune   every export vs a from-scratch network of the same architecture on 10% of the labels, the
              same budget, two seeds;
then a results table and where the pictures are.

Each stage runs as the command a user would type (printed before it runs), so the demo doubles as a
walk-through. A stage whose export already exists is skipped: re-running resumes; `--fresh` starts over.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# The demo's sizes. 64 px images with 8 px patches (an 8x8 grid: a shape spans several patches), a dVAE
# tokenizer at 64 px (8x8 ids), and fine-tuning on 10% of the labels. See BENCHMARKS.md, "Does
# pretraining help? (demo data)", for the trials behind these numbers.
# 200 val images per class: at ~30 % top-1, 800 val images put the sampling noise near +-1.6 points.
DEFAULTS = dict(images_per_class=200, val_per_class=200, tokenizer_steps=200, pretrain_steps=1000, mae_steps=1000,
                milan_steps=200, finetune_epochs=50, finetune_seeds=(0, 1))
PRESETS = dict(tokenizer=CONFIGS / "tokenizers" / "demo_dvae_cpu.yaml", pretrain=CONFIGS / "pretrain" / "demo_beit_cpu.yaml",
               mae=CONFIGS / "pretrain" / "demo_mae_cpu.yaml", milan=CONFIGS / "pretrain" / "demo_milan_cpu.yaml",
               finetune=CONFIGS / "finetune" / "demo_cpu.yaml")


def run_stage(title: str, cmd: list[str], env: dict) -> float:
    """Run one stage as a subprocess, streaming its output; fail loudly with the command to re-run."""
    print(f"\n=== {title}\n$ {shlex.join(cmd)}", flush=True)
    start = time.time()
    result = subprocess.run(cmd, env=env, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"demo: stage '{title}' failed (exit {result.returncode}); re-run: {shlex.join(cmd)}")
    return time.time() - start


def launcher(nproc: int, module: str) -> list[str]:
    """`torchrun --nproc_per_node N -m module`: the same entry `deepspeed` or `srun` would start."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module]


def first_and_last(run_dir: Path, key: str) -> tuple[float, float] | None:
    """The first and last logged value of a metric (the closing "end" record carries none)."""
    from mimkit.runlog import read_metrics

    values = [row[key] for row in read_metrics(run_dir) if isinstance(row.get(key), (int, float))]
    return (values[0], values[-1]) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mimkit demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="run root of the demo (default: runs/demo)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks per DeepSpeed stage (default: 2)")
    parser.add_argument("--tokenizer-steps", type=int, default=DEFAULTS["tokenizer_steps"])
    parser.add_argument("--pretrain-steps", type=int, default=DEFAULTS["pretrain_steps"])
    parser.add_argument("--mae-steps", type=int, default=DEFAULTS["mae_steps"], help="MAE steps (0: skip MAE)")
    parser.add_argument("--milan-steps", type=int, default=DEFAULTS["milan_steps"],
                        help="MILAN steps with the BEiT export as teacher (0: skip MILAN)")
    parser.add_argument("--finetune-epochs", type=int, default=DEFAULTS["finetune_epochs"])
    parser.add_argument("--finetune-seeds", type=int, nargs="+", default=list(DEFAULTS["finetune_seeds"]),
                        help="fine-tuning seeds (each draws its own labelled subset); the table shows the mean")
    parser.add_argument("--images-per-class", type=int, default=DEFAULTS["images_per_class"],
                        help="demo train images per class (10%% of them keep their labels for fine-tuning)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every training stage (the data stays seed 0)")
    parser.add_argument("--fresh", action="store_true", help="delete the previous demo run first")
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank: the ranks share the cores
    times: dict[str, float] = {}

    print("=== 1. demo data", flush=True)
    from mimkit.checkpoint.export_format import is_export
    from mimkit.data.demo import make_demo_data

    start = time.time()
    data = make_demo_data(out / "data", images_per_class=args.images_per_class,
                          val_per_class=DEFAULTS["val_per_class"])
    times["data"] = time.time() - start
    print(f"{data.num_train} train / {data.num_val} val images of {len(data.class_names)} classes "
          f"({', '.join(data.class_names)}) in {out / 'data'}")

    def stage(key: str, title: str, module: str, name: str, steps: int, *extra: str) -> Path:
        """Run one DeepSpeed stage into OUT/NAME unless its export exists; its folder."""
        run_dir = out / name
        if not is_export(run_dir / "export"):
            times[key] = run_stage(title, launcher(args.nproc, module) + [
                "--config", str(PRESETS[key]), f"run.root={out}", f"run.name={name}", f"run.steps={steps}",
                f"run.seed={args.seed}", f"data.shards={data.train_shard_pattern}", *extra], env)
        return run_dir

    tok_dir = stage("tokenizer", "2. tokenizer: tiny DALL-E dVAE", "mimkit.tokenizers", "tokenizer", args.tokenizer_steps)
    beit_dir = stage("pretrain", "3. pretrain: BEiT on the dVAE's tokens", "mimkit.pretrain", "beit", args.pretrain_steps,
                     f"data.seed={args.seed}", f"method.tokenizer={tok_dir / 'export'}")
    mae_dir = out / "mae"
    if args.mae_steps:
        stage("mae", "4. pretrain: MAE, normalised-pixel targets", "mimkit.pretrain", "mae", args.mae_steps,
              f"data.seed={args.seed}")
    # MILAN needs a CLIP teacher; no weights can be downloaded here, so the demo's own BEiT encoder
    # (an export with a CLS token) is the teacher: its features and CLS attention are real, learned ones.
    milan_dir = out / "milan"
    if args.milan_steps:
        stage("milan", "5. pretrain: MILAN, the BEiT encoder as teacher", "mimkit.pretrain", "milan", args.milan_steps,
              f"data.seed={args.seed}", f"method.teacher.export={beit_dir / 'export'}")

    comparison = out / "finetune_comparison.json"
    if comparison.exists() and "top1_runs" not in next(iter(json.loads(comparison.read_text()).values())):
        comparison.unlink()  # an older mimkit's one-seed table: fine-tune again
    if not comparison.exists():
        inits = [f"{name}={folder / 'export'}" for name, folder in (("mae", mae_dir), ("beit", beit_dir), ("milan", milan_dir))
                 if is_export(folder / "export")]
        times["finetune"] = run_stage("6. finetune: each export vs scratch, 10% of the labels",
                                      [sys.executable, "-m", "mimkit.finetune.compare_init",
                                       *[f"--init={init}" for init in inits],
                                       "--seeds", *map(str, args.finetune_seeds), "--no-table",
                                       "--config", str(PRESETS["finetune"]),
                                       f"run.root={out}", "run.name=finetune",
                                       f"data.root={data.imagefolder_train.parent}", f"data.num_classes={len(data.class_names)}",
                                       "data.label_fraction=0.1",
                                       f"optim.epochs={args.finetune_epochs}"], env)

    print_summary(out, tok_dir, beit_dir, mae_dir, milan_dir, comparison, times)
    return 0


def print_summary(out: Path, tok_dir: Path, beit_dir: Path, mae_dir: Path, milan_dir: Path, comparison: Path,
                  times: dict) -> None:
    """What was written where, then the results: the tables come last, where a reader's eye lands."""
    print("\n=== what was produced")
    print(f"  tokenizer export   {tok_dir / 'export'}")
    print(f"  pretrained exports {beit_dir / 'export'}, {mae_dir / 'export'}, {milan_dir / 'export'}")
    print(f"  metrics            {out}/*/metrics.jsonl")
    print(f"  TensorBoard        tensorboard --logdir {out}")
    for folder in (tok_dir / "pictures", beit_dir / "pictures", mae_dir / "pictures", milan_dir / "pictures"):
        pictures = sorted(p.name for p in folder.glob("*.png"))
        if pictures:
            print(f"  pictures           {folder}: {', '.join(pictures[:6])}{' ...' if len(pictures) > 6 else ''}")
    if times:
        print("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    rows = json.loads(comparison.read_text())
    print("\n=== results")
    print(f"{'stage':<32}{'metric':<18}{'first':>10}{'last':>10}")
    print("-" * 70)
    for label, run, key in (("tokenizer (dVAE)", tok_dir, "loss"), ("tokenizer (dVAE)", tok_dir, "codebook_usage"),
                            ("pretrain (BEiT)", beit_dir, "loss"), ("pretrain (BEiT)", beit_dir, "mlm_acc"),
                            ("pretrain (MAE)", mae_dir, "loss"),
                            ("pretrain (MILAN)", milan_dir, "loss"), ("pretrain (MILAN)", milan_dir, "loss_masked")):
        series = first_and_last(run, key)
        if series:
            print(f"{label:<32}{key:<18}{series[0]:>10.4f}{series[1]:>10.4f}")
    from mimkit.finetune.compare_init import format_table  # here: it imports the trainer (accelerate, timm)

    print("\n" + format_table(rows))
