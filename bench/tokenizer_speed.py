"""How fast each tokenizer turns a batch into ids at the paper sizes (ViT-B scale), fp32 on CPU.

    python bench/tokenizer_speed.py [--batch 8] [--iters 3] [--threads N]

Prints one JSON object: per tokenizer, the input size, grid, vocabulary, parameter count of what the
export holds (encoder + codebook), and images per second of ``Tokenizer.tokenize``. Random weights:
speed does not depend on training. The models are built from the paper presets' defaults
(``DVAEConfig()``, ``VQGANConfig()``, ``VQKDConfig()``) without decoders, as an export loads them.
"""

from __future__ import annotations

import argparse
import os
import json
import platform
import time

import torch

from mimkit.checkpoint.tokenizer_export import tokenizer_classes

PAPER = {  # kind -> input size (BEiT's 112 px DALL-E view; 224 px for PeCo and VQ-KD: a 14x14 grid each)
    "dvae": 112,
    "peco": 224,
    "vqkd": 224,
}


def bench_one(kind: str, size: int, batch: int, iters: int) -> dict:
    cfg_cls, model_cls = tokenizer_classes(kind)
    cfg = cfg_cls(build_decoder=False)
    model = model_cls(cfg).eval()
    images = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        model.tokenize(images)  # warm-up: allocator, kernels
        start = time.perf_counter()
        for _ in range(iters):
            ids = model.tokenize(images)
        seconds = time.perf_counter() - start
    return {"input_size": size, "grid": list(ids.shape[1:]), "vocab_size": model.vocab_size,
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "batch": batch, "iters": iters, "images_per_s": round(batch * iters / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0")) or None)
    parser.add_argument("--kinds", nargs="*", default=list(PAPER))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {kind: bench_one(kind, PAPER[kind], args.batch, args.iters) for kind in args.kinds}
    print(json.dumps({"benchmark": "tokenize", "device": "cpu", "dtype": "fp32", "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
