"""Fine-tuning: metrics, label subsets, both data formats, 2 processes == 1 process, linear probe,
resume, refusal of pickled code, and pretrained-vs-scratch on the demo data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mimkit_test_distributed import inject_payload, run_torchrun  # tests/distributed.py, registered by conftest.py
from mimkit.config import load_config
from mimkit.data.demo import make_demo_data
from mimkit.finetune.class_data import TarShardImages, label_subset
from mimkit.finetune.config import FinetuneConfig
from mimkit.finetune.metrics import topk_correct
from mimkit.checkpoint.safe_load import CheckpointError
from mimkit.finetune.trainer import ResumeError, train
from mimkit.runlog import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "finetune" / "tiny_cpu.yaml"
ENTRY = Path(__file__).parent / "dist_scripts_ft" / "finetune_entry.py"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    # 4 classes x 40 train, 4 x 11 val (44: not a multiple of 2 processes x eval batch, so padding happens)
    return make_demo_data(tmp_path_factory.mktemp("demo") / "data", num_classes=4, images_per_class=40,
                          val_per_class=11, image_size=32, images_per_shard=64)


def _cfg(tmp_path, *overrides):
    return load_config(FinetuneConfig, TINY, [f"run.root={tmp_path}", *overrides])


def test_topk_correct_by_hand():
    logits = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
    targets = torch.tensor([1, 1, 0, 2])
    # top1 hits: sample 0 only; top2 adds sample 1 (0.3 second) and sample 3 (0.3 second)
    assert topk_correct(logits, targets, ks=(1, 2, 5)) == {1: 1, 2: 3, 5: 4}


def test_label_subset_is_class_balanced_and_seeded():
    targets = [0] * 50 + [1] * 30 + [2] * 5
    keep = label_subset(targets, 0.1, seed=3)
    picked = [targets[i] for i in keep]
    assert [picked.count(c) for c in range(3)] == [5, 3, 1]
    assert keep == label_subset(targets, 0.1, seed=3) and keep != label_subset(targets, 0.1, seed=4)


def test_tar_shards_index_matches_imagefolder_counts(demo):
    shards = TarShardImages(demo.train_shard_pattern)
    assert len(shards) == demo.num_train
    assert sorted(set(shards.targets)) == list(range(demo.num_classes))
    image, label = shards[len(shards) - 1]
    assert image.size == (32, 32) and 0 <= label < demo.num_classes


def test_shards_and_imagefolder_train_and_evaluate(demo, tmp_path):
    common = ["optim.epochs=1", "optim.max_steps=2", "aug.enabled=false"]
    a = train(_cfg(tmp_path, "run.name=folder", f"data.root={demo.imagefolder_train.parent}", *common))
    b = train(_cfg(tmp_path, "run.name=shards", "data.format=shards", f"data.train_shards={demo.train_shard_pattern}",
                   f"data.val_shards={demo.val_shard_pattern}", *common))
    assert a["count"] == b["count"] == demo.num_val


def test_a_compiled_network_trains_as_the_eager_one(demo, tmp_path):
    # aot_eager: dynamo's capture and AOTAutograd's joint graph without inductor's code generation (minutes
    # of C++ compilation on this CPU); a GPU run uses inductor
    common = [f"data.root={demo.imagefolder_train.parent}", "optim.epochs=1", "optim.max_steps=3",
              "aug.enabled=false", "model.drop_path=0.0", "run.log_every=1", "compile_backend=aot_eager"]
    from torch._dynamo.utils import counters

    counters.clear()
    eager = train(_cfg(tmp_path, "run.name=eager", *common))
    assert not counters["stats"]["unique_graphs"]
    compiled = train(_cfg(tmp_path, "run.name=compiled", "compile=true", *common))
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured the network
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-4)
    assert compiled["top1"] == eager["top1"]
    losses = [[r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r] for name in ("eager", "compiled")]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-4)  # step by step


def test_two_processes_give_the_same_accuracy_as_one(demo, tmp_path):
    args = ["--config", str(TINY), f"run.root={tmp_path}", f"data.root={demo.imagefolder_train.parent}",
            "optim.epochs=2", "aug.enabled=false", "model.drop_path=0.0", "data.eval_batch_size=10"]
    one = train(_cfg(tmp_path, *args[3:], "run.name=one"))
    run_torchrun(ENTRY, [*args, "run.name=two"], cwd=tmp_path, timeout=400)
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    assert two["count"] == one["count"] == demo.num_val  # padded duplicates not counted
    assert two["top1"] == one["top1"] and two["top5"] == one["top5"]
    assert abs(two["loss"] - one["loss"]) < 1e-3


def test_linear_probe_trains_only_the_head_and_resumes(demo, tmp_path):
    args = ["mode=linprobe", "run.name=probe", f"data.root={demo.imagefolder_train.parent}", "optim.epochs=2",
            "optim.layer_decay=null", "optim.weight_decay=0.0", "aug.enabled=false", "run.save_every=1", "ema=0.9"]
    first = train(_cfg(tmp_path, *args, "optim.epochs=1"))
    ckpt = tmp_path / "probe" / "checkpoints"
    assert (ckpt / "latest").read_text() == "epoch_0000"
    from safetensors.torch import load_file
    saved = load_file(str(ckpt / "epoch_0000" / "model.safetensors"))
    assert "head.0.running_mean" in saved and "head.0.weight" not in saved  # BatchNorm without affine
    resumed = train(_cfg(tmp_path, *args))  # continues at epoch 1
    assert resumed["steps"] == 2 * first["steps"] and "ema_top1" in resumed
    after = load_file(str(ckpt / "epoch_0001" / "model.safetensors"))
    encoder = [k for k in saved if k.startswith("encoder.")]
    assert encoder and all(torch.equal(saved[k], after[k]) for k in encoder)  # frozen
    assert not torch.equal(saved["head.1.weight"], after["head.1.weight"])


def test_resume_refuses_a_checkpoint_whose_files_carry_code(demo, tmp_path):
    """Every pickle of a fine-tuning checkpoint (optimizer, each process's RNG) carries a payload whose
    record matches (a tamperer's work): resuming refuses by name and nothing runs."""
    args = ["mode=linprobe", "run.name=probe", f"data.root={demo.imagefolder_train.parent}", "optim.epochs=1",
            "optim.layer_decay=null", "aug.enabled=false", "run.save_every=1"]
    train(_cfg(tmp_path, *args))
    pickles = sorted((tmp_path / "probe" / "checkpoints" / "epoch_0000").glob("*.pt"))
    assert {p.name for p in pickles} >= {"optimizer.pt", "rng_0.pt"}
    for path in pickles:
        inject_payload(path, tmp_path / f"ran_{path.stem}")
    with pytest.raises(CheckpointError, match=r"epoch_0000/\S+\.pt: refused to unpickle"):
        train(_cfg(tmp_path, *args, "optim.epochs=2"))
    assert not list(tmp_path.glob("ran_*"))


def test_unusable_settings_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"run.log_every=0: expected >= 1"):
        train(_cfg(tmp_path, "run.log_every=0"))
    with pytest.raises(ValueError, match=r"precision='fp8': expected one of"):
        train(_cfg(tmp_path, "precision=fp8"))
    with pytest.raises(ValueError, match=r"precision=fp16 needs a GPU"):  # cpu=true: no loss scaler here
        train(_cfg(tmp_path, "precision=fp16"))
    with pytest.raises(ResumeError, match=r"run.resume=.*nowhere.*no state.json"):
        train(_cfg(tmp_path, "run.name=r", f"run.resume={tmp_path / 'nowhere'}", "data.root=unused"))
    assert not (tmp_path / "finetune").exists()  # refused before the run folder was made


def test_the_ema_copy_follows_what_prepare_did_to_the_model(demo, tmp_path, monkeypatch):
    """On a GPU `accelerator.prepare` moves the network to the device; the EMA copy must be made after it
    (a copy made before stays on the CPU and every update crosses the bus). No GPU here: a prepare that
    also turns the network to float64 stands in for the move, and the EMA copy must follow it."""
    from mimkit.finetune.trainer import build_step, check_config, make_accelerator
    from mimkit.runlog import MetricsLogger

    cfg = _cfg(tmp_path, "run.name=ema", f"data.root={demo.imagefolder_train.parent}", "ema=0.99")
    accelerator = make_accelerator(cfg)
    prepare = accelerator.prepare

    def prepare_and_move(*objects):
        return prepare(*(o.to(torch.float64) if isinstance(o, torch.nn.Module) else o for o in objects))

    monkeypatch.setattr(accelerator, "prepare", prepare_and_move)
    step = build_step(cfg, check_config(cfg), accelerator, tmp_path, None, MetricsLogger(tmp_path, enabled=False))
    assert {p.dtype for p in step.ema.module.parameters()} == {torch.float64}
    step.update_ema(1)  # the update runs between tensors of one device and dtype
