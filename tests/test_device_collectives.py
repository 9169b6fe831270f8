"""Every collective of the pretraining and tokenizer loops hands NCCL tensors on the engine's device.

No machine here has a GPU or NCCL, so the test uses a stand-in (tests/dist_scripts/device_guard.py): a
torch function mode follows which tensors would live on the accelerator on a GPU node, and
torch.distributed's collectives refuse a host tensor when mimkit's own code hands one over, as NCCL
refuses a CPU tensor. One 2-rank launch runs BEiT (with k-NN monitoring, checkpoints and the export),
MILAN (guided masks from the teacher) and VQ-KD (codebook k-means, EMA, dead-code restarts) under it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mimkit_test_distributed as _helper  # tests/distributed.py, registered by conftest.py
from mimkit.checkpoint.tokenizer_export import save_random_tokenizer_export
from mimkit.data.demo import make_demo_data

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = _helper.SCRIPTS


def test_residency_follows_where_a_tensor_would_live():
    import sys

    sys.path.insert(0, str(SCRIPTS))
    try:
        from device_guard import Residency, on_accelerator
    finally:
        sys.path.remove(str(SCRIPTS))
    weight = torch.nn.Parameter(torch.ones(3))
    with Residency("cpu"):
        host = torch.tensor([1.0, 2.0, 3.0])
        placed = torch.zeros(3, device="cpu")
        moved = host.to("cpu")
        assert not on_accelerator(host) and on_accelerator(placed) and on_accelerator(moved)
        assert moved is not host and not on_accelerator(host)  # a no-op move does not re-label its source
        assert on_accelerator(host * weight) and on_accelerator(placed + host) and not on_accelerator(host + 1)
        assert not on_accelerator(placed.cpu()) and on_accelerator(torch.empty_like(placed))
        assert on_accelerator(host.to(placed)) and on_accelerator(placed.to(torch.float64))
        assert not on_accelerator(torch.from_numpy(host.numpy()))


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    demo = make_demo_data(root / "demo", image_size=32, images_per_shard=50)
    tok = save_random_tokenizer_export(root / "tok", "dvae", input_size=32, seed=3)
    common = [f"data.shards={demo.shards_dir}", f"run.root={root / 'runs'}", "run.resume=none", "run.log_every=1",
              "data.num_workers=0"]
    knn = [f"knn.train={demo.imagefolder_train}", f"knn.val={demo.imagefolder_val}", "knn.every=2",
           "knn.num_workers=0"]
    stages = [
        ["pretrain", ["--config", str(ROOT / "configs/pretrain/beit_tiny_cpu.yaml"), *common, "run.name=beit",
                      f"method.tokenizer={tok}", "run.steps=4", "run.save_every=2", "run.export=true", *knn]],
        ["pretrain", ["--config", str(ROOT / "configs/pretrain/milan_tiny_cpu.yaml"), *common, "run.name=milan",
                      "run.steps=3", "run.save_every=3", "run.picture_every=0"]],
        ["tokenizers", ["--config", str(ROOT / "configs/tokenizers/vqkd_tiny_cpu.yaml"), *common, "run.name=vqkd",
                        "run.steps=12", "run.usage_every=4", "vqkd.codebook.restart_every=3"]],
    ]
    out = root / "guard.json"
    # cwd: the VQ-KD preset names configs/tokenizers/open_clip_tiny.json relative to the repository root
    _helper.run_torchrun(SCRIPTS / "guarded_stages.py", [json.dumps(stages), out], cwd=ROOT, timeout=600)
    return json.loads(out.read_text())


def test_the_guard_refuses_a_host_tensor(guarded):
    assert guarded["control"].startswith("refused: dist.all_reduce from codebook.py:all_reduce_sum_")


def test_every_collective_of_the_loops_uses_the_engine_device(guarded):
    """The run finished (a host tensor in any of mimkit's collectives would have stopped it), and the guard
    judged the collectives it is meant to: metric windows, the engine's non-finite vote, the preemption
    flag (on its own gloo group), the closing record, k-NN, the codebook's k-means, EMA and usage counts."""
    seen = guarded["seen"]
    for site in ("loop.py:read", "stream.py:skip_totals", "trainer.py:log_end", "knn.py:__call__",
                 "engine.py:any_rank", "preempt.py:should_stop", "codebook.py:all_reduce_sum_",
                 "codebook.py:broadcast_", "codebook.py:gather_rows"):
        assert seen.get(site, 0) > 0, (site, seen)
