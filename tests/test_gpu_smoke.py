"""scripts/gpu_smoke.sh and what it stands on: the demo's --device / --precision settings, and the checks
run after the chain (`mimkit.demo.smoke`). The chain itself on a GPU cannot run here: `--dry-run` shows
the commands, and the checks run on real run folders and exports written by the library's writers."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mimkit.checkpoint.export_format import encoder_meta, pixel_norm, write_export
from mimkit.demo.chain import device_settings
from mimkit.demo.smoke import SmokeFailure, check_losses, check_vit_export
from mimkit.models.vit import VisionTransformer, preset
from mimkit.runlog import MetricsLogger

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_smoke.sh"


def dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args, "--dry-run"], capture_output=True, text=True, cwd=ROOT)


def test_dry_run_shows_the_chain_on_one_gpu_in_bf16_then_the_checks():
    demo, check = dry_run().stdout.splitlines()
    assert "-m mimkit.demo --device cuda --precision bf16 --nproc 1 --fresh" in demo and "--detect-steps 0" in demo
    assert check.rstrip().endswith("-m mimkit.demo.smoke runs/gpu_smoke")
    assert "--device cpu --precision fp32" in dry_run("--cpu").stdout
    wrong = subprocess.run(["bash", str(SCRIPT), "--gpus=8"], capture_output=True, text=True, cwd=ROOT)
    assert wrong.returncode == 2 and "unknown argument '--gpus=8'" in wrong.stderr


def test_device_settings_reach_every_stage():
    cpu = device_settings("cpu", None)
    assert cpu.env == {"DS_ACCELERATOR": "cpu"} and cpu.nproc == 2
    assert cpu.engine == ["engine.precision=fp32"] and cpu.finetune == ["cpu=true", "precision=fp32"]
    gpu = device_settings("cuda", None)
    assert gpu.env == {"DS_ACCELERATOR": "cuda"} and gpu.engine == ["engine.precision=bf16"]
    assert gpu.finetune == ["cpu=false", "precision=bf16"]
    assert device_settings("cuda", "fp32").engine == ["engine.precision=fp32"]


def test_losses_must_be_logged_and_finite(tmp_path):
    with pytest.raises(SmokeFailure, match="no losses logged"):
        check_losses(tmp_path)
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    logger.log(1, loss=2.0, recon_loss=1.0, lr=0.1)
    logger.log(2, loss=1.5, recon_loss=0.5)
    assert check_losses(tmp_path) == "4 losses finite"
    logger.log(3, loss=math.nan)
    with pytest.raises(SmokeFailure, match="loss=nan at step 3"):
        check_losses(tmp_path)


def test_an_export_must_load_whole_and_give_finite_features(tmp_path):
    vit = preset("vit_tiny_cpu")
    meta = encoder_meta(vit, pixel_norm([0.5] * 3, [0.25] * 3, vit.img_size, "bicubic"), method="mae",
                        tokenizer=None, teacher=None)
    weights = {k: v for k, v in VisionTransformer(vit).state_dict().items() if not k.startswith("head")}
    good = write_export(tmp_path / "good", weights, meta)
    assert check_vit_export(good).startswith("loads")
    missing = write_export(tmp_path / "missing", {k: v for k, v in weights.items() if k != "norm.weight"}, meta)
    with pytest.raises(SmokeFailure, match="missing from the export.*norm.weight"):
        check_vit_export(missing)
    broken = write_export(tmp_path / "nan", {**weights, "norm.bias": torch.full_like(weights["norm.bias"], math.nan)},
                          meta)
    with pytest.raises(SmokeFailure, match="non-finite features"):
        check_vit_export(broken)


def test_gpu_checks_runs_the_bench_and_says_what_it_ran_on(tmp_path):
    # --cpu: bench/gpu.py at its tiny size (no wheels to install here: the venv has everything)
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_checks.sh"), "bench", "--cpu"], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "torch " in (tmp_path / "versions.txt").read_text() and "deepspeed" in (tmp_path / "versions.txt").read_text()
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert set(result["objectives"]) >= {"beit", "mae", "milan"} and "beit_mfu" in done.stdout
    wrong = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_checks.sh"), "all", "--gpus=8"], capture_output=True,
                           text=True, cwd=ROOT)
    assert wrong.returncode == 2 and "unknown argument '--gpus=8'" in wrong.stderr


def test_a_chain_killed_before_its_export_fails_the_smoke_in_one_line(tmp_path, capsys):
    from mimkit.demo.smoke import main

    MetricsLogger(tmp_path / "tokenizer", enabled=True, tensorboard=False).log(1, loss=1.0)
    assert main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("smoke: FAILED: ") and "tokenizer/export" in err
