"""MILAN pretraining step: ViT-B/16 student (visible-only), ViT-B/16 open_clip teacher, prompting decoder.

Prints one JSON object: steps per second and the share of the step spent in the teacher (targets: the
teacher's forward plus guided mask sampling), measured apart from the student's forward / backward /
optimizer step. Random weights (nothing is downloaded); the numbers depend only on the architecture.

    python bench/milan_step.py [--batch 64] [--steps 10] [--device cuda] [--precision bf16]
    python bench/milan_step.py --tiny          # the tiny CPU preset, for a quick check
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from mimkit.models.vit import preset
from mimkit.pretrain.config import PretrainConfig
from mimkit.pretrain.milan import MilanConfig
from mimkit.pretrain.parts import masked_regression
from mimkit.teachers import TeacherConfig, tiny_open_clip_cfg

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="per-step batch (default: 64 cuda, 4 cpu)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="fp32 | bf16 (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--tiny", action="store_true", help="tiny student and teacher (CPU check)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    batch_size = args.batch or (64 if device.type == "cuda" else 4)
    torch.manual_seed(0)

    if args.tiny:
        encoder_cfg = preset("vit_tiny_cpu", pos_embed="sincos")
        cfg = MilanConfig(decoder_dim=64, decoder_depth=2, decoder_heads=4,
                          teacher=TeacherConfig(model_cfg=tiny_open_clip_cfg(), precision=precision))
    else:
        encoder_cfg = preset("vit_base_patch16")
        cfg = MilanConfig(teacher=TeacherConfig(model_name="ViT-B-16", precision=precision))
    milan = masked_regression(PretrainConfig(model=encoder_cfg), cfg)
    model, targets = milan.model, milan.targets
    model.to(device).train()
    targets.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    size = encoder_cfg.img_size
    batch = {"image": torch.randn(batch_size, 3, size, size, device=device)}
    generator = torch.Generator().manual_seed(0)

    teacher_s, total_s = 0.0, 0.0
    for step in range(args.warmup + args.steps):
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():                      # teacher forward + guided mask sampling, outside the engine
            t = dict(batch, **targets(batch))
            t.update({k: v.to(device) for k, v in milan.masks(batch_size, generator, t["scores"]).items()})
        _sync(device)
        t1 = time.perf_counter()
        with autocast:
            out = model(t)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        t2 = time.perf_counter()
        if step >= args.warmup:
            teacher_s += t1 - t0
            total_s += t2 - t0

    result = {
        "bench": "milan_step",
        "student": "vit_tiny_cpu" if args.tiny else "vit_base_patch16",
        "teacher": "tiny open_clip" if args.tiny else "open_clip ViT-B-16 (random weights)",
        "decoder": f"prompting {cfg.decoder_depth} x {cfg.decoder_dim}",
        "image_size": size, "batch": batch_size, "precision": precision, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "steps": args.steps,
        "steps_per_s": round(args.steps / total_s, 4),
        "images_per_s": round(args.steps * batch_size / total_s, 2),
        "step_ms": round(1000 * total_s / args.steps, 1),
        "teacher_ms": round(1000 * teacher_s / args.steps, 1),
        "teacher_share": round(teacher_s / total_s, 3),
        "final_loss": round(float(out["loss"].detach()), 4),
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
