"""Resume time of a ViT-B/16 ZeRO-2 checkpoint with and without verification, on 2 CPU ranks.

    python bench/resume_verify.py [--repeats 3] [--ranks 2]

Launches itself under torchrun (``--ranks``, gloo; 1 rank leaves the second core free for the hashing
thread, as a GPU node's spare cores do). One AdamW step on a ViT-B/16 regression (so the
optimizer partitions hold their moments), one save through CheckpointStore, then per repeat, in turn:
``verified``: ``CheckpointStore.load`` (sizes and the allow-list scan first, then DeepSpeed's load
through the allow-listed reader while a thread on each rank checks its share of the SHA-256s: the way
a run resumes); ``verify_then_load``: the full verification (sizes, SHA-256, scan) and then the load, one
after the other (the previous way); ``unverified``: DeepSpeed's load through the same reader alone;
``verify_only``: the full verification alone. Also the save with hashing vs DeepSpeed's save alone.
Each row twice: ``warm`` (files in the page cache) and ``cold`` (page cache dropped before each
timing, where /proc/sys/vm/drop_caches is writable: root). Medians over repeats, in seconds, as one
JSON object printed by rank 0.
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


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (root only), so the next read comes from the disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def timed(fn, cold: bool = False) -> float:
    import torch.distributed as dist

    if cold and dist.get_rank() == 0:
        drop_page_cache()
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def worker(out_dir: Path, repeats: int) -> None:
    import torch

    from mimkit.checkpoint import store as store_module
    from mimkit.checkpoint.store import CheckpointStore, _from_rank0, verify_checkpoint
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

    def verify_then_load():
        verify_checkpoint(tag_dir)
        unverified()

    ways = {"verified": lambda: store.load(engine, "auto"), "verify_then_load": verify_then_load,
            "unverified": unverified, "verify_only": lambda: verify_checkpoint(tag_dir)}
    can_drop = drop_page_cache() if engine.rank == 0 else False
    caches = ["warm", "cold"] if _from_rank0(can_drop) else ["warm"]
    rows = {cache: {way: [] for way in ways} for cache in caches}
    unverified()  # the warm rows read cached files
    for _ in range(repeats):
        for cache in caches:
            for way, fn in ways.items():
                rows[cache][way].append(timed(fn, cold=cache == "cold"))
    if engine.rank == 0:
        files = sorted(p for p in tag_dir.iterdir() if p.is_file())
        result = {"checkpoint": f"ViT-B/16 (86M params), ZeRO-2 fp32, {engine.world_size} ranks",
                  "files_mb": {p.name: round(p.stat().st_size / 2**20, 1) for p in files},
                  "resume_s": {cache: {k: round(statistics.median(v), 2) for k, v in ways_.items()}
                               for cache, ways_ in rows.items()},
                  "save_s": {"with_hashes": round(statistics.median(save_s), 2),
                             "deepspeed_only": round(statistics.median(plain_save_s), 2)},
                  "repeats": repeats, "machine": f"{platform.processor() or platform.machine()}, "
                                                 f"{os.cpu_count()} cores, no GPU",
                  "torch": torch.__version__}
        print(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker), args.repeats)
        return
    torchrun = Path(sys.executable).parent / "torchrun"
    with tempfile.TemporaryDirectory(prefix="resume_verify_") as tmp:
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        subprocess.run([str(torchrun), "--nproc_per_node", str(args.ranks), "--master_port", "29631", __file__,
                        "--worker", tmp, "--repeats", str(args.repeats)], check=True, env=env, cwd=tmp)


if __name__ == "__main__":
    main()
