"""Every stage trains in bf16, as on a GPU (DeepSpeed's bf16 engine: bf16 parameters and activations, fp32
master weights; accelerate's bf16 autocast for fine-tuning). On this CPU bf16 matmuls are slow, so the
models are the tiny presets and the runs a few steps: what is checked is that no op meets a dtype it
refuses (a fp32 buffer promoting bf16 tokens, a frozen network in another dtype) and that the losses are
finite and fall. One 2-rank launch runs the DeepSpeed stages; the exports are read back."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mimkit_test_distributed as _helper  # tests/distributed.py, registered by conftest.py
from mimkit.checkpoint.export_format import is_export
from mimkit.checkpoint.load import load_vit_export
from mimkit.checkpoint.tokenizer_export import load_tokenizer, save_random_tokenizer_export
from mimkit.data.demo import make_demo_data
from mimkit.runlog import read_metrics

ROOT = Path(__file__).resolve().parents[1]
STAGES = {  # run name -> (stage, preset, its own overrides)
    "dvae": ("tokenizers", "configs/tokenizers/dvae_tiny_cpu.yaml", ["run.steps=6"]),
    "vqkd": ("tokenizers", "configs/tokenizers/vqkd_tiny_cpu.yaml", ["run.steps=6"]),
    "beit": ("pretrain", "configs/pretrain/beit_tiny_cpu.yaml", ["run.steps=6"]),
    "mae": ("pretrain", "configs/pretrain/mae_tiny_cpu.yaml", ["run.steps=6"]),
    "milan": ("pretrain", "configs/pretrain/milan_tiny_cpu.yaml", ["run.steps=6", "run.picture_every=0"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    demo = make_demo_data(root / "demo", image_size=32, images_per_shard=50)
    tok = save_random_tokenizer_export(root / "tok", "dvae", input_size=32, seed=3)
    common = [f"data.shards={demo.shards_dir}", f"run.root={root / 'runs'}", "run.resume=none", "run.log_every=1",
              "data.num_workers=0", "engine.precision=bf16"]
    stages = [[stage, ["--config", str(ROOT / preset), *common, f"run.name={name}", *own,
                       *(["run.export=true"] if stage == "pretrain" else []),
                       *([f"method.tokenizer={tok}"] if name == "beit" else [])]]
              for name, (stage, preset, own) in STAGES.items()]
    # cwd: the VQ-KD preset names configs/tokenizers/open_clip_tiny.json relative to the repository root
    _helper.run_torchrun(_helper.SCRIPTS / "run_stages.py", [json.dumps(stages)], cwd=ROOT, timeout=600)
    return root, demo


@pytest.mark.parametrize("name", list(STAGES))
def test_deepspeed_stage_trains_in_bf16_and_exports(runs, name):
    root, _ = runs
    run = root / "runs" / name
    assert yaml.safe_load((run / "config.yaml").read_text())["engine"]["precision"] == "bf16"
    losses = [r["loss"] for r in read_metrics(run) if isinstance(r.get("loss"), float)]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses), losses
    assert all(r.get("skipped_steps", 0) == 0 for r in read_metrics(run))  # no step lost to a non-finite value
    assert is_export(run / "export")
    exported = load_file(str(run / "export" / "model.safetensors"))
    weights = [w for k, w in exported.items() if w.is_floating_point() and w.numel() > 1 and "norm" not in k]
    # the fp32 master weights, not the module's bf16-rounded ones: most values are not bf16 numbers
    off_grid = sum(int((w != w.bfloat16().float()).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert off_grid > 0.5, off_grid  # module weights would give 0
    if STAGES[name][0] == "tokenizers":
        tokenizer = load_tokenizer(run / "export")
        ids = tokenizer.tokenize(torch.rand(2, 3, *tokenizer.input_size))
        assert ids.dtype == torch.long
    else:
        model, _ = load_vit_export(run / "export")
        assert {p.dtype for p in model.parameters()} == {torch.float32}  # exports keep the fp32 master weights
        assert torch.isfinite(model.forward_features(torch.rand(1, 3, 32, 32))).all()


def test_fine_tuning_trains_in_bf16_from_a_bf16_pretraining(runs, tmp_path):
    # its own process: accelerate's state (mixed precision included) is one per process
    root, demo = runs
    done = subprocess.run([sys.executable, "-m", "mimkit.finetune", "--config", str(ROOT / "configs/finetune/tiny_cpu.yaml"),
                           f"run.root={tmp_path}", "run.name=ft", f"data.root={demo.imagefolder_train.parent}",
                           "precision=bf16", f"model.init={root / 'runs' / 'mae' / 'export'}", "optim.epochs=1",
                           "optim.max_steps=4", "run.log_every=1"], capture_output=True, text=True, cwd=tmp_path,
                          env=_helper.dist_env(), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    losses = [r["loss"] for r in read_metrics(tmp_path / "ft") if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert json.loads((tmp_path / "ft" / "results.json").read_text())["mixed_precision"] == "bf16"
