"""`data.mode: device` inside the real pretraining trainer: the workers stop at uint8 views, the batched
device transform (on the engine's device, in the engine's dtype) finishes them, and the run trains on the
same batches as worker mode: the same losses, step for step (fp32, no colour jitter, where the two modes
agree to rounding). On a GPU the same code copies uint8 from page-locked memory and works in floats there.
`data.mode: decode_on_device` (JPEG bytes decoded by the device transform, here on the CPU) trains on the
same batches as device mode too."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import mimkit_test_distributed as _helper  # tests/distributed.py, registered by conftest.py
from mimkit.data.demo import make_demo_data
from mimkit.data.stream import DataConfig, build_stream
from mimkit.runlog import read_metrics

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "pretrain" / "mae_tiny_cpu.yaml"
MODES = ("worker", "device", "decode_on_device")


def test_the_device_transform_lives_on_the_stream_device_in_its_dtype(tmp_path):
    demo = make_demo_data(tmp_path / "demo", image_size=32, images_per_shard=50)
    cfg = DataConfig(shards=str(demo.shards_dir), image_size=32, batch_size=4, num_workers=0, mode="device")
    stream = build_stream(cfg, device="meta", dtype=torch.bfloat16)  # meta: a device that is not the CPU
    assert stream.device_transform.mean.is_meta and stream.device_transform.dtype == torch.bfloat16
    assert not stream.pin_memory  # page-locked only where batches go to a GPU
    assert build_stream(DataConfig(**{**cfg.__dict__, "pin_memory": True})).pin_memory


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    demo = make_demo_data(root / "demo", image_size=32, images_per_shard=50)
    for mode in MODES:
        _helper.run_torchrun(_helper.SCRIPTS / "run_pretrain.py", [
            "--config", PRESET, f"data.shards={demo.shards_dir}", f"run.root={root}", f"run.name={mode}",
            f"data.mode={mode}", "data.color_jitter=0.0", "data.num_workers=1", "run.steps=4", "run.log_every=1",
            "run.save_every=0", "run.export=false"], cwd=root, timeout=300)
    return {mode: [r["loss"] for r in read_metrics(root / mode) if "loss" in r] for mode in MODES}


def test_device_mode_trains_on_the_worker_mode_batches(runs):
    assert len(runs["device"]) == len(runs["worker"]) == 4
    assert runs["device"] == pytest.approx(runs["worker"], rel=1e-4)
    assert runs["device"][-1] < runs["device"][0]


def test_decode_on_device_trains_on_the_device_mode_batches(runs):
    # the demo JPEGs decode to the same pixels with torchvision's libjpeg-turbo as with PIL's
    assert len(runs["decode_on_device"]) == 4 and all(math.isfinite(loss) for loss in runs["decode_on_device"])
    assert runs["decode_on_device"] == pytest.approx(runs["device"], rel=1e-4)
