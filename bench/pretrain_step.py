"""BEiT ViT-B/16 pretraining step vs timm's ViT-B/16 training step, side by side, fp32 on this machine.

    python bench/pretrain_step.py [--batch 8] [--steps 4] [--zero-stage 0]

Prints one JSON object: steps/s of each (median over interleaved timed steps, so load from other
processes hits both alike), FLOPs per step (torch's FLOP counter: matmuls and attention), achieved
GFLOP/s, and the fp32 matmul peak measured here with a large square matmul.

BEiT side: `MaskedTokenPrediction` (the preset configs/pretrain/beit_vit_b16.yaml: q/v bias, shared
rel-pos, LayerScale, mask token, drop path 0.1, 8192-way head on the 75 masked patches) through the
mimkit DeepSpeed engine (one process, gloo), step = forward + backward + AdamW + the engine's
non-finite check. The frozen tokenizer is left out (random target ids): bench/tokenizer_speed.py times it.
timm side: `vit_base_patch16_224` forward + cross-entropy on 1000 classes + backward + torch AdamW.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402


def matmul_peak_gflops(n: int = 4096, reps: int = 5) -> float:
    """Best-of fp32 GEMM rate: the ceiling a training step could reach on this CPU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def count_flops(step_fn) -> int:
    with FlopCounterMode(display=False) as counter:
        step_fn(count_only=True)
    return counter.get_total_flops()


def build_beit(batch: int, zero_stage: int):
    from mimkit.data.masking import BlockMasks
    from mimkit.distributed.engine import Engine, EngineConfig
    from mimkit.models.vit import VisionTransformer
    from mimkit.optim import param_groups
    from mimkit.pretrain.beit import MaskedTokenPrediction
    from mimkit.pretrain.config import load_pretrain_config

    cfg = load_pretrain_config(ROOT / "configs" / "pretrain" / "beit_vit_b16.yaml", ["method.tokenizer=unused"])
    torch.manual_seed(0)
    model = MaskedTokenPrediction(VisionTransformer(cfg.model), vocab_size=8192)
    engine = Engine(model, param_groups(model, 0.05), EngineConfig(zero_stage=zero_stage, clip_grad=3.0),
                    micro_batch_size=batch, lr=1.5e-3)
    masks = BlockMasks((14, 14), cfg.method.num_masked, cfg.method.min_block)(batch, torch.Generator().manual_seed(0))
    data = {"image": torch.randn(batch, 3, 224, 224), "ids": torch.randint(0, 8192, (batch, 196)), **masks}

    def step(count_only: bool = False):
        if count_only:  # FLOPs of forward + backward, without moving the weights
            model(data)["loss"].backward()
            model.zero_grad(set_to_none=True)
            return
        engine.train_step(engine(data)["loss"])

    return step, engine


def build_timm(batch: int):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", num_classes=1000)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-3, weight_decay=0.05)
    images, labels = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))

    def step(count_only: bool = False):
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        if not count_only:
            opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="timed steps of each, interleaved")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--zero-stage", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    peak = matmul_peak_gflops()
    beit_step, engine = build_beit(args.batch, args.zero_stage)
    timm_step = build_timm(args.batch)
    flops = {"beit": count_flops(beit_step), "timm": count_flops(timm_step)}
    for _ in range(args.warmup):
        beit_step()
        timm_step()
    times: dict[str, list[float]] = {"beit": [], "timm": []}
    for _ in range(args.steps):  # interleaved: a burst of load from elsewhere slows both
        for name, fn in (("beit", beit_step), ("timm", timm_step)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    load = os.getloadavg()

    result = {"bench": "pretrain_step", "batch": args.batch, "precision": "fp32", "zero_stage": args.zero_stage,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "machine": platform.processor() or platform.machine(), "loadavg_1_5_15": [round(x, 2) for x in load],
              "matmul_peak_gflops": round(peak, 1), "skipped_steps": engine.skipped_steps}
    for name in ("beit", "timm"):
        sec = statistics.median(times[name])
        result[name] = {"steps_per_s": round(1 / sec, 4), "sec_per_step": round(sec, 3),
                        "all_sec": [round(s, 3) for s in times[name]],
                        "gflop_per_step": round(flops[name] / 1e9, 1),
                        "achieved_gflops": round(flops[name] / sec / 1e9, 1),
                        "fraction_of_matmul_peak": round(flops[name] / sec / 1e9 / peak, 3)}
    result["beit_vs_timm_steps_per_s"] = round(result["beit"]["steps_per_s"] / result["timm"]["steps_per_s"], 3)
    result["beit_vs_timm_gflops"] = round(result["beit"]["achieved_gflops"] / result["timm"]["achieved_gflops"], 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
