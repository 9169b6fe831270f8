"""Detection fine-tuning (ViTDet Mask R-CNN on the demo's COCO-style data): a short run lifts box AP above
its step-0 value and writes COCO's 12 numbers and pictures; 2 processes score the same weights to the same
AP as 1; a run preempted mid-epoch (SIGUSR1) resumes to exactly the uninterrupted run's weights, with
large-scale jitter and drop path on (fp32); bad settings are refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file

from mimkit_test_distributed import run_torchrun  # tests/distributed.py, registered by conftest.py
from mimkit.config import load_config
from mimkit.data.demo import make_demo_data
from mimkit.distributed.loop import Preempted
from mimkit.finetune.config import FinetuneConfig
from mimkit.finetune.coco_eval import STAT_NAMES
from mimkit.finetune.tasks import resolve_task, task_for
from mimkit.finetune.trainer import main, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "finetune" / "coco_maskrcnn_tiny_cpu.yaml"
ENTRY = Path(__file__).parent / "dist_scripts_ft" / "finetune_entry.py"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    # 4 classes x 12 train (48 images: 6 batches of 8), 4 x 3 val (12: two processes get 6 each)
    return make_demo_data(tmp_path_factory.mktemp("demo") / "data", num_classes=4, images_per_class=12,
                          val_per_class=3, image_size=64)


def _args(demo, tmp_path, *overrides) -> list[str]:
    return [f"run.root={tmp_path}", f"data.root={demo.coco_root}", "data.batch_size=8", "data.eval_batch_size=4",
            "options.num_pictures=2", *overrides]


def _cfg(demo, tmp_path, *overrides) -> FinetuneConfig:
    return resolve_task(load_config(FinetuneConfig, TINY, _args(demo, tmp_path, *overrides)))


def _step0_box_ap(cfg: FinetuneConfig) -> float:
    """The network the run starts from (same seed), scored as the run scores it."""
    set_seed(cfg.run.seed)
    task = task_for(cfg.task).build(cfg)
    model = task.build_model().model
    _, val = task.build_loaders(cfg.model.img_size, Accelerator(cpu=True))
    return task.evaluate(model, val, Accelerator(cpu=True))["bbox_AP"]


def test_short_finetune_lifts_box_ap_and_two_processes_score_it_alike(demo, tmp_path):
    cfg = _cfg(demo, tmp_path, "run.name=short", "optim.epochs=7", "eval_every=7")
    before = _step0_box_ap(cfg)
    result = train(cfg)
    run = tmp_path / "short"
    assert result["steps"] == 42 and result["count"] == demo.num_val
    assert result["bbox_AP"] > before + 1.0, (before, result["bbox_AP"])  # percent
    assert result["segm_AP"] > 0.0
    table = json.loads((run / "coco_eval.json").read_text())
    assert list(table) == ["bbox", "segm"] and list(table["bbox"]) == list(STAT_NAMES)
    assert table["bbox"]["AP"] == result["bbox_AP"]
    assert "Average Precision" in (run / "coco_eval.txt").read_text()
    assert (run / "pictures" / "detections.png").stat().st_size > 1000
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_objectness", "loss_classifier", "loss_box_reg", "loss_mask"} <= set(losses[0])

    # the same run on 2 processes: it resumes at its end and only evaluates, each process half the images
    run_torchrun(ENTRY, ["--config", str(TINY), *_args(demo, tmp_path, "run.name=short", "optim.epochs=7",
                                                     "eval_every=7")], cwd=tmp_path, timeout=300)
    two = json.loads((run / "results.json").read_text())
    assert two["num_processes"] == 2 and two["count"] == demo.num_val
    for key in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AR100"):
        assert two[key] == pytest.approx(result[key], abs=1e-9), key


def _weights(run: Path) -> dict:
    ckpt = run / "checkpoints"
    return load_file(str(ckpt / (ckpt / "latest").read_text() / "model.safetensors"))


def test_preempted_mid_epoch_resumes_to_the_uninterrupted_weights(demo, tmp_path):
    # 48 images / 8 = 6 steps an epoch; the signal after step 9 (epoch 1, batch 3); jitter and drop path on
    common = ("optim.epochs=2", "eval_every=2", "model.drop_path=0.2", "options.num_pictures=0", "run.save_every=1")
    straight = train(_cfg(demo, tmp_path, "run.name=straight", *common))
    with pytest.raises(Preempted):
        train(_cfg(demo, tmp_path, "run.name=cut", "debug.signal_at_step=9", *common))
    tag = (tmp_path / "cut" / "checkpoints" / "latest").read_text()
    assert tag == "epoch_0001_step_00000009"
    resumed = train(_cfg(demo, tmp_path, "run.name=cut", *common))
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert resumed["bbox_AP"] == straight["bbox_AP"] and resumed["segm_AP"] == straight["segm_AP"]


@pytest.mark.parametrize("override, message", [
    ("data.root=/nonexistent", "data.root=/nonexistent: no image folder"),
    ("options.scale_range=[2.0,1.0]", "options.scale_range"),
    ("options.anchor_sizes=[8,16]", "options.anchor_sizes"),
    ("mode=linprobe", "mode='linprobe'"),
])
def test_unusable_settings_are_refused_before_any_work(demo, tmp_path, override, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("[", r"\[").replace("(", r"\(")):
        train(_cfg(demo, tmp_path, "run.name=bad", override))
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_the_command_names_a_wrong_value_in_one_line(demo, tmp_path, capsys):
    assert main(["--config", str(TINY), *_args(demo, tmp_path, "run.name=bad", "options.hflip=0.5",
                                                "data.root=/nonexistent")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["finetune: data.root=/nonexistent: no image folder /nonexistent/images/train"]
