"""Detection fine-tuning speed: the ViTDet Mask R-CNN's training and inference images per second.

    python bench/finetune_detection.py [--presets tiny vitb] [--steps 3] [--batch 1] [--device cpu|cuda]

The network is built as a run builds it, from the presets (configs/finetune/coco_maskrcnn_tiny_cpu.yaml: 64 px,
dim 64, depth 2; configs/finetune/coco_maskrcnn_vitdet_b16.yaml: ViT-B/16 at 1024 px, 12 blocks with 14 x 14
windows and 4 global, 256-d pyramid), from scratch, on COCO's 80 classes. Inputs are synthetic: images and 3 to
6 random boxes per image with filled masks. A training step is the task's loss (forward with RPN / RoI
sampling), backward and AdamW on the layer-decay groups; inference is the forward in eval mode and the
post-processing a COCO evaluation runs (masks pasted at the image's size). The score threshold is set to 0, so
inference always keeps 100 detections an image (the upper bound of its post-processing). fp32 on CPU, bf16
autocast on a GPU. Median over timed steps after a warm-up. Prints one JSON object per preset.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"tiny": ROOT / "configs" / "finetune" / "coco_maskrcnn_tiny_cpu.yaml",
           "vitb": ROOT / "configs" / "finetune" / "coco_maskrcnn_vitdet_b16.yaml"}

import torch  # noqa: E402


def synthetic_batch(batch: int, size: int, num_classes: int, generator: torch.Generator):
    images = torch.randn(batch, 3, size, size, generator=generator)
    targets = []
    for _ in range(batch):
        n = int(torch.randint(3, 7, (1,), generator=generator))
        xy = torch.rand(n, 2, generator=generator) * size * 0.7
        wh = (0.05 + 0.25 * torch.rand(n, 2, generator=generator)) * size
        boxes = torch.cat([xy, (xy + wh).clamp(max=size)], 1).round()
        masks = torch.zeros(n, size, size, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[i, y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes, "labels": torch.randint(1, num_classes + 1, (n,), generator=generator),
                        "masks": masks, "size": torch.tensor([size, size]), "orig_size": torch.tensor([size, size]),
                        "scale": torch.tensor([1.0, 1.0]), "image_id": 0})
    return images, targets


def to_device(images, targets, device):
    return images.to(device), [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]


def bench(preset: str, steps: int, batch: int, device: str) -> dict:
    from mimkit.config import load_config
    from mimkit.finetune.config import FinetuneConfig
    from mimkit.finetune.detection import build_detector, detection_loss, to_original
    from mimkit.finetune.tasks import resolve_task
    from mimkit.optim import param_groups

    cfg = resolve_task(load_config(FinetuneConfig, PRESETS[preset], ["options.score_threshold=0.0"]))
    num_classes = 80
    built = build_detector(cfg, num_classes)
    model = built.model.to(device)
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay, num_layers=built.encoder.cfg.depth)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr)
    size = cfg.model.img_size
    images, targets = to_device(*synthetic_batch(batch, size, num_classes, torch.Generator().manual_seed(0)), device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def train_step():
        with autocast:
            out = detection_loss(model, images, targets)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()

    @torch.no_grad()
    def infer_step():
        with autocast:
            found = model(images, targets)
        return [to_original({k: v.float() if v.is_floating_point() else v for k, v in d.items()}, t, 0.5)
                for d, t in zip(found, targets)]

    times = {}
    for name, fn, mode in (("train", train_step, True), ("inference", infer_step, False)):
        model.train(mode)
        fn()  # warm-up
        sync()
        laps = []
        for _ in range(steps):
            start = time.perf_counter()
            fn()
            sync()
            laps.append(time.perf_counter() - start)
        times[name] = statistics.median(laps)
    params = sum(p.numel() for p in model.parameters())
    return {"preset": preset, "img_size": size, "batch": batch, "steps": steps, "device": device,
            "params_M": round(params / 1e6, 1),
            "train_images_per_s": round(batch / times["train"], 3), "train_s_per_step": round(times["train"], 3),
            "inference_images_per_s": round(batch / times["inference"], 3),
            "inference_s_per_batch": round(times["inference"], 3),
            "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "vitb"], choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    for preset in args.presets:
        batch = args.batch if preset == "vitb" or args.batch > 1 else 8  # the tiny preset's own batch
        print(json.dumps(bench(preset, args.steps, batch, args.device)), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
