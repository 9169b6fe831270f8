"""Segmentation fine-tuning throughput: training and inference images per second; prints JSON.

    python bench/finetune.py [--tasks segmentation detection] [--sizes tiny vit_b16] [--heads upernet linear]
                             [--steps 3] [--batch 8]

For each (size, head): the `SegmentationModel` of `finetune/segmentation.py` (the ViT encoder, the pyramid
and UperNet + FCN auxiliary head, or Segmenter's linear head) on random images and labels at the crop size:

* train: forward at the crop, the loss at the label's size (main + 0.4 x auxiliary), backward, AdamW step;
* inference: a forward of the same batch under no_grad (one sliding window per image).

tiny: the CPU preset (vit_tiny_cpu: 64 wide, 2 blocks, 8 px patches) at 32 px crops, UperNet 32 channels.
vit_b16: ViT-B/16 at 512 px crops (32 x 32 patches), UperNet 768 channels, FCN 256: the BEiT / MAE ADE20K
network. On a CPU, ViT-B at 512 px takes seconds a step: use a couple of steps (`--steps 2 --batch 2`).
Detection (`--tasks detection`): the ViTDet Mask R-CNN of `finetune/detection.py`, built as a run builds it
from its preset (tiny: configs/finetune/coco_maskrcnn_tiny_cpu.yaml, 64 px, 8 images a step; vit_b16:
coco_maskrcnn_vitdet_b16.yaml, ViT-B/16 at 1024 px with 14 x 14 windows and 4 global blocks, 1 image a step),
80 classes, on random images with 3 to 6 random boxes and filled masks each. train: the task's loss (RPN and
RoI sampling included), backward, AdamW on the layer-decay groups; inference: the eval forward and the
post-processing COCO evaluation runs (boxes and masks pasted at the image's size), with the score threshold
at 0 so every image keeps 100 detections (the most post-processing an image can cost).

The first step (allocation, warm-up) is not timed. fp32 on CPU; bf16 autocast on a GPU. Rates are per wall
second; CPU seconds are reported too (other load on a shared machine slows the wall clock, not the CPU time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from mimkit.finetune.segmentation import SegmentationModel, SegmentationOptions, pixel_loss
from mimkit.models.vit import VisionTransformer, preset

SIZES = {
    "tiny": dict(vit="vit_tiny_cpu", crop=32, options=dict(channels=32, aux_channels=16)),
    "vit_b16": dict(vit="vit_base_patch16", crop=512, options=dict(channels=768, aux_channels=256)),
}


def build(size: str, head: str, num_classes: int) -> SegmentationModel:
    spec = SIZES[size]
    encoder = VisionTransformer(preset(spec["vit"], img_size=spec["crop"], drop_path=0.1))
    opts = SegmentationOptions(head=head, crop_size=spec["crop"], **spec["options"])
    return SegmentationModel(encoder, opts, num_classes)


def timed(fn, steps: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds) per call, after one untimed call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def measure(size: str, head: str, batch: int, steps: int, device: torch.device, num_classes: int = 150) -> dict:
    torch.manual_seed(0)
    model = build(size, head, num_classes).to(device)
    crop = SIZES[size]["crop"]
    images = torch.randn(batch, 3, crop, crop, device=device)
    labels = torch.randint(0, num_classes, (batch, crop, crop), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def train_step():
        with autocast:
            out, aux = model(images, with_aux=True)
            loss = pixel_loss(out, labels) + (0.4 * pixel_loss(aux, labels) if aux is not None else 0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer():
        with torch.no_grad(), autocast:
            model(images)

    model.train()
    train_wall, train_cpu = timed(train_step, steps, device)
    model.eval()
    infer_wall, infer_cpu = timed(infer, steps, device)
    params = sum(p.numel() for p in model.parameters())
    return {"size": size, "head": head, "crop": crop, "batch": batch, "steps": steps, "params_M": round(params / 1e6, 2),
            "train_images_per_s": round(batch / train_wall, 3), "train_cpu_s_per_step": round(train_cpu, 3),
            "inference_images_per_s": round(batch / infer_wall, 3), "inference_cpu_s_per_step": round(infer_cpu, 3)}


DETECTION = {"tiny": ("coco_maskrcnn_tiny_cpu.yaml", None), "vit_b16": ("coco_maskrcnn_vitdet_b16.yaml", 1)}
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"


def synthetic_detection_batch(batch: int, size: int, num_classes: int, device: torch.device):
    """Random images and 3 to 6 random boxes an image, each with its filled box as mask."""
    g = torch.Generator().manual_seed(0)
    images, targets = torch.randn(batch, 3, size, size, generator=g), []
    for _ in range(batch):
        n = int(torch.randint(3, 7, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * size * 0.7
        boxes = torch.cat([xy, (xy + (0.05 + 0.25 * torch.rand(n, 2, generator=g)) * size).clamp(max=size)], 1).round()
        masks = torch.zeros(n, size, size, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[i, y1:y2, x1:x2] = 1
        target = {"boxes": boxes, "labels": torch.randint(1, num_classes + 1, (n,), generator=g), "masks": masks,
                  "size": torch.tensor([size, size]), "orig_size": torch.tensor([size, size]),
                  "scale": torch.tensor([1.0, 1.0])}
        targets.append({k: v.to(device) for k, v in target.items()})
    return images.to(device), targets


def measure_detection(size: str, batch: int, steps: int, device: torch.device, num_classes: int = 80) -> dict:
    from mimkit.finetune.detection import build_detector, detection_loss, to_original
    from mimkit.finetune.tasks import resolve_task
    from mimkit.config import load_config
    from mimkit.finetune.config import FinetuneConfig
    from mimkit.optim import param_groups

    torch.manual_seed(0)
    preset_file, fixed_batch = DETECTION[size]
    cfg = resolve_task(load_config(FinetuneConfig, CONFIGS / preset_file, ["options.score_threshold=0.0"]))
    batch = fixed_batch or batch
    built = build_detector(cfg, num_classes)
    model = built.model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay,
                                               num_layers=built.encoder.cfg.depth), lr=cfg.optim.lr)
    crop = cfg.model.img_size
    images, targets = synthetic_detection_batch(batch, crop, num_classes, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def train_step():
        with autocast:
            loss = detection_loss(model, images, targets)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer():
        with torch.no_grad(), autocast:
            found = model(images, targets)
            for d, t in zip(found, targets):
                to_original({k: v.float() if v.is_floating_point() else v for k, v in d.items()}, t, 0.5)

    model.train()
    train_wall, train_cpu = timed(train_step, steps, device)
    model.eval()
    infer_wall, infer_cpu = timed(infer, steps, device)
    params = sum(p.numel() for p in model.parameters())
    return {"task": "detection", "size": size, "crop": crop, "batch": batch, "steps": steps,
            "params_M": round(params / 1e6, 2),
            "train_images_per_s": round(batch / train_wall, 3), "train_cpu_s_per_step": round(train_cpu, 3),
            "inference_images_per_s": round(batch / infer_wall, 3), "inference_cpu_s_per_step": round(infer_cpu, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["segmentation", "detection"], choices=["segmentation", "detection"])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "vit_b16"], choices=sorted(SIZES))
    parser.add_argument("--heads", nargs="+", default=["upernet", "linear"], choices=["upernet", "linear", "mask_transformer"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one untimed)")
    parser.add_argument("--batch", type=int, default=8, help="images per step (tiny)")
    parser.add_argument("--batch-vit-b", type=int, default=2, help="images per step (ViT-B/16 at 512 px)")
    parser.add_argument("--steps-vit-b", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = []
    for size in args.sizes:
        big = size == "vit_b16"
        steps = args.steps_vit_b if big else args.steps
        for head in args.heads if "segmentation" in args.tasks else ():
            results.append(measure(size, head, args.batch_vit_b if big else args.batch, steps, device))
            print(json.dumps(results[-1]), flush=True)
        if "detection" in args.tasks:
            results.append(measure_detection(size, args.batch, steps, device))
            print(json.dumps(results[-1]), flush=True)
    machine = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    print(json.dumps({"machine": machine, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
