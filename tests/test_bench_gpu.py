"""bench/gpu.py end to end on CPU at the tiny size, as a user runs it: a subprocess with real DeepSpeed (one
process), real timm and a real randomly initialised open_clip teacher. No GPU here: the CPU run stands in
for it, and the bf16 run exercises DeepSpeed's bf16 wrapper and timm's autocast that a GPU run takes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ("beit", "mae", "milan")


def run_bench(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--device", "cpu", "--steps", "2",
           "--warmup", "1", "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def fp32_result(tmp_path_factory):
    return run_bench(tmp_path_factory.mktemp("gpu_fp32"))


def timm_tiny_forward_flops() -> int:
    import timm

    model = timm.create_model("vit_base_patch16_224", num_classes=1000, img_size=32, patch_size=8, embed_dim=64,
                              depth=2, num_heads=4)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.zeros(4, dtype=torch.long))
    return counter.get_total_flops()


def test_every_objective_has_its_rates_flops_and_timm_ratio(fp32_result):
    r = fp32_result
    assert r["device"] == "cpu" and r["precision"] == "fp32" and r["batch"] == 4
    assert r["peak"]["tflops"] > 0 and r["peak"]["source"].startswith("measured on this CPU")
    timm = r["timm"]
    assert timm["images_per_s"] > 0 and len(timm["step_ms_runs"]) == 2
    for name in OBJECTIVES:
        row = r["objectives"][name]
        assert row["images_per_s"] > 0 and row["flops_per_step"] > 0, name
        assert row["step_ms"] == pytest.approx(1000 * 4 / row["images_per_s"], rel=1e-3)
        assert row["timm_images_per_s"] == timm["images_per_s"]
        assert row["vs_timm_images_per_s"] == pytest.approx(row["images_per_s"] / timm["images_per_s"], rel=1e-3)
        assert row["mfu"] == pytest.approx(row["achieved_tflops"] / r["peak"]["tflops"], rel=1e-2)
        assert row["peak_memory_gib"] is None  # CPU: no allocator statistics
        assert row["sdpa"]["kernel"] in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
    # BEiT's attention carries the relative-position bias; MAE's and MILAN's do not
    assert r["objectives"]["beit"]["sdpa"]["uses_bias"] and not r["objectives"]["mae"]["sdpa"]["uses_bias"]
    milan = r["objectives"]["milan"]
    assert 0 < milan["teacher_share"] < 1
    assert 0 < milan["teacher"]["flops_per_step"] < milan["flops_per_step"]  # the step counts the teacher too
    assert all(goal["met"] is None for goal in r["goals"].values())  # goals are judged on a bf16 GPU run only


def test_flops_count_forward_and_backward(fp32_result):
    # backward costs twice the forward's matmuls, less the patch convolution's input gradient (images need none)
    ratio = fp32_result["timm"]["flops_per_step"] / timm_tiny_forward_flops()
    assert 2.5 < ratio <= 3.0, ratio


def test_bf16_runs_deepspeed_bf16_and_profiles(tmp_path):
    r = run_bench(tmp_path, "--precision", "bf16", "--objectives", "mae", "milan", "--profile", "1")
    assert r["precision"] == "bf16" and set(r["objectives"]) == {"mae", "milan"}
    for row in r["objectives"].values():
        assert row["images_per_s"] > 0 and row["optimizer_wrapper"] != "SkippableAdamW"  # DeepSpeed's bf16 wrapper
    assert r["timm"]["precision"].startswith("torch.autocast bf16")
    profile = r["profile"]
    assert profile["objective"] == "mae" and len(profile["top"]) == 15
    assert sum(op["share"] for op in profile["top"]) <= 1.0 + 1e-6
