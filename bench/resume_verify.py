"""Resume time of a ViT-B/16 ZeRO-2 checkpoint with and without verification, on 2 CPU ranks.

    python bench/resume_verify.py [--repeats 3]

Launches itself under torchrun (2 ranks, gloo). One AdamW step on a ViT-B/16 regression (so the
optimizer partitions hold their moments), one save through CheckpointStore, then per repeat, in turn:
``verified``: ``CheckpointStore.load`` (every file's size and SHA-256 checked against complete.json and
every pickle scanned by the allow-listed unpickler, the two ranks sharing the files, then DeepSpeed's
load through the allow-listed reader); ``unverified``: DeepSpeed's load through the same reader alone;
``verify_only``: the verification alone. Also the save with hashing vs DeepSpeed's save alone. Files
come from the page cache after the first read (a warm resume); medians over repeats, in seconds, as
one JSON object printed by rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))


def timed(fn) -> float:
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def worker(out_dir: Path, repeats: int) -> None:
    import torch

    from mimkit.checkpoint import store as store_module
    from mimkit.checkpoint.store import CheckpointStore, verify_checkpoint
    from mimkit.distributed.engine import Engine, EngineConfig
    from mimkit.models.vit import VisionTransformer, preset
    from mimkit.optim import param_groups

    torch.manual_seed(0)
    model = VisionTransformer(preset("vit_base_patch16"))
    engine = Engine(model, param_groups(model, 0.05), EngineConfig(zero_stage=2), micro_batch_size=1)
    x = torch.randn(1, 3, 224, 224)
    engine.train_step(engine(x).float().pow(2).mean())
    store = CheckpointStore(out_dir, keep=5)
    save_s = [timed(lambda i=i: store.save(engine, 10 + i, {})) for i in range(repeats)]
    tag_dir = out_dir / store.latest()
    plain_save_s = [timed(lambda i=i: engine.ds.save_checkpoint(str(out_dir), tag=f"plain_{i}", client_state={},
                                                               save_latest=False)) for i in range(repeats)]

    def unverified():
        with store_module._deepspeed_reads_tensors_only(engine.ds):
            engine.ds.load_checkpoint(str(out_dir), tag=tag_dir.name, load_optimizer_states=True,
                                      load_lr_scheduler_states=False)

    rows = {"verified": [], "unverified": [], "verify_only": []}
    unverified()  # warm the page cache: every row reads cached files
    for _ in range(repeats):
        rows["verified"].append(timed(lambda: store.load(engine, "auto")))
        rows["unverified"].append(timed(unverified))
        rows["verify_only"].append(timed(lambda: verify_checkpoint(tag_dir)))
    if engine.rank == 0:
        files = sorted(p for p in tag_dir.iterdir() if p.is_file())
        result = {"checkpoint": "ViT-B/16 (86M params), ZeRO-2 fp32, 2 ranks",
                  "files_mb": {p.name: round(p.stat().st_size / 2**20, 1) for p in files},
                  "resume_s": {k: round(statistics.median(v), 2) for k, v in rows.items()},
                  "save_s": {"with_hashes": round(statistics.median(save_s), 2),
                             "deepspeed_only": round(statistics.median(plain_save_s), 2)},
                  "repeats": repeats, "machine": f"{platform.processor() or platform.machine()}, "
                                                 f"{os.cpu_count()} cores, no GPU",
                  "torch": torch.__version__}
        print(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker), args.repeats)
        return
    torchrun = Path(sys.executable).parent / "torchrun"
    with tempfile.TemporaryDirectory(prefix="resume_verify_") as tmp:
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29631", __file__,
                        "--worker", tmp, "--repeats", str(args.repeats)], check=True, env=env, cwd=tmp)


if __name__ == "__main__":
    main()
