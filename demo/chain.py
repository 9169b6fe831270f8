"""`mimkit demo`: the whole chain on the embedded demo data, in about ten minutes on 2 CPU cores.

1. data       build the demo images (ImageFolder, tar shards, ADE20K-style, COCO) from pictures shipped
              inside scikit-image / scikit-learn;
2. tokenizer  train a tiny DALL-E dVAE on the shards (DeepSpeed ZeRO-2, 2 ranks) and export it;
3. pretrain   BEiT masked-token prediction with that tokenizer (DeepSpeed ZeRO-2, 2 ranks), exported;
4. pretrain   MAE (pixel targets, no tokenizer) on the same shards, exported;
5. pretrain   MILAN, the BEiT encoder standing in for CLIP as the teacher, exported;
6. finetune   every export vs a from-scratch network of the same architecture on 10% of the labels, the
              same budget, two seeds;
7. segment    the same comparison for semantic segmentation on the ADE20K-style folder (Segmenter's linear
              head, a short budget), mIoU;
8. detect     a short ViTDet Mask R-CNN fine-tune on the COCO-style json for every export vs scratch,
              box AP and mask AP (COCOeval) on the first val images;
then a results table, where the pictures are, and one picture of each pretraining's k-NN accuracy
(`knn_top1`, evaluated at the start, halfway and at the end on the demo's labelled ImageFolder).

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
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# The demo's sizes. 64 px images with 8 px patches (an 8x8 grid: a shape spans several patches), a dVAE
# tokenizer at 64 px (8x8 ids), and fine-tuning on 10% of the labels. See BENCHMARKS.md, "Does
# pretraining help? (demo data)", for the trials behind these numbers.
# 200 val images per class: at ~30 % top-1, 800 val images put the sampling noise near +-1.6 points.
DEFAULTS = dict(images_per_class=200, val_per_class=200, tokenizer_steps=200, pretrain_steps=1000, mae_steps=1000,
                milan_steps=200, finetune_epochs=50, finetune_seeds=(0, 1), detect_steps=30, detect_val_images=100)
PRESETS = dict(tokenizer=CONFIGS / "tokenizers" / "demo_dvae_cpu.yaml", pretrain=CONFIGS / "pretrain" / "demo_beit_cpu.yaml",
               mae=CONFIGS / "pretrain" / "demo_mae_cpu.yaml", milan=CONFIGS / "pretrain" / "demo_milan_cpu.yaml",
               finetune=CONFIGS / "finetune" / "demo_cpu.yaml", segmentation=CONFIGS / "finetune" / "demo_seg_cpu.yaml",
               detect=CONFIGS / "finetune" / "coco_maskrcnn_tiny_cpu.yaml")


def knn_overrides(data, every: int) -> list[str]:
    """A pretraining's k-NN monitoring on the demo's ImageFolder (train images are the neighbours, val
    images are classified) every `every` steps, at the start and at the end."""
    return [f"knn.every={every}", f"knn.train={data.imagefolder_train}",
            f"knn.val={data.imagefolder_val}", "knn.num_workers=0"]


def save_knn_curves(out: Path, runs: dict[str, Path]) -> None:
    """One picture of every pretraining's k-NN top-1 against its steps, and one line saying where it is."""
    from mimkit.pictures import save_curves
    from mimkit.runlog import read_metrics

    records = {name: [r for r in read_metrics(run) if "knn_top1" in r] for name, run in runs.items()}
    records = {name: rows for name, rows in records.items() if rows}
    if records:
        path = save_curves(records, ["knn_top1"], out / "knn_curves.png")
        change = ", ".join(f"{name} {rows[0]['knn_top1']:.1f} -> {rows[-1]['knn_top1']:.1f}" for name, rows in records.items())
        print(f"\nk-NN top-1 (first -> last evaluation): {change}\n  k-NN curves        {path}")


@dataclass
class DeviceSettings:
    env: dict[str, str]  # for every stage's process
    nproc: int  # ranks per DeepSpeed stage
    engine: list[str]  # overrides of the DeepSpeed stages (tokenizer, pretraining)
    finetune: list[str]  # overrides of the fine-tuning stages


def device_settings(device: str, precision: str | None) -> DeviceSettings:
    """What `--device` and `--precision` change in each stage: the presets are CPU ones (fp32, `cpu: true`)."""
    precision = precision or ("fp32" if device == "cpu" else "bf16")
    nproc = 2 if device == "cpu" else max(1, _cuda_devices())
    return DeviceSettings(env={"DS_ACCELERATOR": device}, nproc=nproc, engine=[f"engine.precision={precision}"],
                          finetune=[f"cpu={str(device == 'cpu').lower()}", f"precision={precision}"])


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


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
    parser.add_argument("--nproc", type=int, default=None,
                        help="ranks per DeepSpeed stage (default: 2 on cpu, one per GPU on cuda)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where every stage runs (cuda: DeepSpeed's CUDA accelerator, NCCL, one rank per GPU)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="training precision of every stage (default: fp32 on cpu, bf16 on cuda)")
    parser.add_argument("--tokenizer-steps", type=int, default=DEFAULTS["tokenizer_steps"])
    parser.add_argument("--pretrain-steps", type=int, default=DEFAULTS["pretrain_steps"])
    parser.add_argument("--mae-steps", type=int, default=DEFAULTS["mae_steps"], help="MAE steps (0: skip MAE)")
    parser.add_argument("--milan-steps", type=int, default=DEFAULTS["milan_steps"],
                        help="MILAN steps with the BEiT export as teacher (0: skip MILAN)")
    parser.add_argument("--finetune-epochs", type=int, default=DEFAULTS["finetune_epochs"])
    parser.add_argument("--finetune-seeds", type=int, nargs="+", default=list(DEFAULTS["finetune_seeds"]),
                        help="fine-tuning seeds (each draws its own labelled subset); the table shows the mean")
    parser.add_argument("--detect-steps", type=int, default=DEFAULTS["detect_steps"],
                        help="detection fine-tuning steps per arm (0: skip detection)")
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
    settings = device_settings(args.device, args.precision)
    env.update(settings.env)
    nproc = args.nproc or settings.nproc
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
            # k-NN at the start, halfway and the end: ~1.3 s each on 2 cores
            knn = knn_overrides(data, max(1, steps // 2)) if module == "mimkit.pretrain" else []
            times[key] = run_stage(title, launcher(nproc, module) + [
                "--config", str(PRESETS[key]), f"run.root={out}", f"run.name={name}", f"run.steps={steps}",
                f"run.seed={args.seed}", f"data.shards={data.train_shard_pattern}", *settings.engine, *extra, *knn], env)
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

    inits = [f"--init={name}={folder / 'export'}" for name, folder in (("mae", mae_dir), ("beit", beit_dir), ("milan", milan_dir))
             if is_export(folder / "export")]

    def compare(key: str, title: str, preset: str, *extra: str) -> Path:
        """Each export vs scratch (`compare_init`) into OUT/KEY_comparison.json unless it exists; that file."""
        table = out / f"{key}_comparison.json"
        if not table.exists():
            times[key] = run_stage(title, [sys.executable, "-m", "mimkit.finetune.compare_init", *inits,
                                           "--seeds", *map(str, args.finetune_seeds), "--no-table", "--config", str(PRESETS[preset]),
                                           f"run.root={out}", f"run.name={key}", *settings.finetune, *extra], env)
        return table

    comparison = out / "finetune_comparison.json"
    if comparison.exists() and "top1_runs" not in next(iter(json.loads(comparison.read_text()).values())):
        comparison.unlink()  # an older mimkit's one-seed table: fine-tune again
    compare("finetune", "6. finetune: each export vs scratch, 10% of the labels", "finetune",
            f"data.root={data.imagefolder_train.parent}", f"data.num_classes={len(data.class_names)}",
            "data.label_fraction=0.1", f"optim.epochs={args.finetune_epochs}")
    segmentation = compare("segmentation", "7. segment: each export vs scratch on the ADE20K-style folder",
                           "segmentation", f"data.root={data.ade_root}")

    # one seed (the later --seeds wins; flags last: --columns takes every word after it): about a minute
    detection = compare("detect", "8. detect: ViTDet Mask R-CNN, each export vs scratch", "detect",
                        f"data.root={data.coco_root}", "optim.epochs=1", f"optim.max_steps={args.detect_steps}",
                        f"options.max_val_images={DEFAULTS['detect_val_images']}",
                        "--seeds", "0", "--columns", "bbox_AP", "segm_AP") if args.detect_steps else None

    print_summary(out, tok_dir, beit_dir, mae_dir, milan_dir, comparison, times, segmentation, detection)
    save_knn_curves(out, {"BEiT": beit_dir, "MAE": mae_dir, "MILAN": milan_dir})
    return 0


def print_summary(out: Path, tok_dir: Path, beit_dir: Path, mae_dir: Path, milan_dir: Path, comparison: Path,
                  times: dict, segmentation: Path | None = None, detection: Path | None = None) -> None:
    """What was written where, then the results: the tables come last, where a reader's eye lands."""
    print("\n=== what was produced")
    print(f"  tokenizer export   {tok_dir / 'export'}")
    print(f"  pretrained exports {beit_dir / 'export'}, {mae_dir / 'export'}, {milan_dir / 'export'}")
    print(f"  metrics            {out}/*/metrics.jsonl")
    print(f"  TensorBoard        tensorboard --logdir {out}")
    for folder in (tok_dir / "pictures", beit_dir / "pictures", mae_dir / "pictures", milan_dir / "pictures",
                   *sorted(out.glob("segmentation_*/pictures"))[:1], *sorted(out.glob("detect_*/pictures"))[:1]):
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
    if segmentation is not None and segmentation.exists():
        print("\n" + format_table(json.loads(segmentation.read_text()), title="segmentation fine-tuning"))
    if detection is not None and detection.exists():
        print("\n" + format_table(json.loads(detection.read_text()), title="detection fine-tuning",
                                  columns=("bbox_AP", "segm_AP")))
