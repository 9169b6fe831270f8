"""Semantic segmentation: mmsegmentation's metrics by hand, sliding == whole inference for a context-free
net, ADE20K label reduction, BEiT's relative-position resizing against the official scheme, the pyramid,
both data sources, a fine-tune that learns, 2 processes == 1, and a preempted run that resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.utils import set_seed

from mimkit_test_distributed import run_torchrun  # tests/distributed.py, registered by conftest.py
from mimkit.data.demo import make_demo_data
from mimkit.data.shards import write_segmentation_shards
from mimkit.distributed.loop import Preempted
from mimkit.finetune.config import load_finetune_config
from mimkit.finetune.seg_data import SegPipeline, SegmentationSamples, ade_pairs, reduce_zero_label, restore_zero_label, shard_pairs
from mimkit.finetune.seg_metrics import intersect_and_union, predict_logits, summarize
from mimkit.finetune.trainer import check_config, make_accelerator, train
from mimkit.models.pos_embed import num_relative_distances, resize_rel_pos_table
from mimkit.models.pyramid import ViTPyramid, pyramid_blocks
from mimkit.models.vit import VisionTransformer, preset

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "finetune" / "ade20k_tiny_cpu.yaml"
ENTRY = Path(__file__).parent / "dist_scripts_ft" / "finetune_entry.py"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    # 4 classes x 24 train, 4 x 3 val images of 64 px
    return make_demo_data(tmp_path_factory.mktemp("segdemo") / "data", num_classes=4, images_per_class=24,
                          val_per_class=3, image_size=64)


def _cfg(tmp_path, demo, *overrides):
    return load_finetune_config(TINY, [f"run.root={tmp_path}", f"data.root={demo.ade_root}", *overrides])


# ---- metrics -----------------------------------------------------------------------------------------
def test_metrics_equal_the_confusion_matrix_by_hand():
    # 4 classes; class 3 appears nowhere (no IoU, no Acc); class 2 is predicted but never labelled
    # (IoU 0 counts, Acc undefined); 255 pixels are ignored whatever is predicted there.
    label = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 255], [255, 255, 0, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 1, 2, 3], [1, 2, 0, 2]])
    counts = intersect_and_union(pred, label, 4)
    # labelled pixels (9): class 0 at 5 positions, predicted 0,0,0,0,2 -> 3 right... by hand:
    #   (0,0) 0->0  (0,1) 0->1  (1,0) 0->0  (2,2) 0->0  (2,3) 0->2      class 0: 5 labelled, 3 hit
    #   (0,2) 1->1  (0,3) 1->1  (1,1) 1->1  (1,2) 1->2                   class 1: 4 labelled, 3 hit
    # predictions on labelled pixels: 0 x3, 1 x4, 2 x2, 3 x0
    inter, union, area_pred, area_label = counts
    assert inter.tolist() == [3, 3, 0, 0] and area_pred.tolist() == [3, 4, 2, 0]
    assert area_label.tolist() == [5, 4, 0, 0] and union.tolist() == [5, 5, 2, 0]
    m = summarize(counts)
    assert m["mIoU"] == pytest.approx(100 * (3 / 5 + 3 / 5 + 0) / 3)  # class 3 excluded, class 2 counts 0
    assert m["mAcc"] == pytest.approx(100 * (3 / 5 + 3 / 4) / 2)  # classes 2 and 3 have no labelled pixel
    assert m["aAcc"] == pytest.approx(100 * 6 / 9)
    # summed over images, not averaged per image: split the same pixels in two "images"
    halves = intersect_and_union(pred[:2], label[:2], 4) + intersect_and_union(pred[2:], label[2:], 4)
    assert torch.equal(halves, counts)


def test_sliding_window_equals_whole_image_for_a_context_free_net():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 5, 1)  # each pixel's logits depend on that pixel only
    image = torch.randn(1, 3, 37, 50)  # no stride-7 window of 16 tiles it exactly
    whole = predict_logits(net, image, "whole", crop=16, stride=7, flip=False)
    slide = predict_logits(net, image, "slide", crop=16, stride=7, flip=False)
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(predict_logits(net, image, "slide", 16, 7, flip=True), whole, rtol=1e-5, atol=1e-5)
    blurred = torch.nn.Conv2d(3, 5, 5, padding=2)  # with context, windows differ from the whole image at their edges
    assert not torch.allclose(predict_logits(blurred, image, "slide", 16, 7, False),
                              predict_logits(blurred, image, "whole", 16, 7, False), atol=1e-4)


def test_ade_labels_round_trip():
    ade = np.arange(151, dtype=np.uint8).reshape(1, -1)  # 0 = other, 1..150 the classes
    train = reduce_zero_label(ade)
    assert train[0, 0] == 255 and train[0, 1:].tolist() == list(range(150))
    assert np.array_equal(restore_zero_label(train), ade)


# ---- model pieces ------------------------------------------------------------------------------------
def _official_rel_pos_resize(table: np.ndarray, src: int, dst: int) -> np.ndarray:
    """BEiT's semantic-segmentation checkpoint loading, written from its description: the old offsets sit at
    0, +-1, +-(1 + q), +-(1 + q + q^2), ... with q found by bisection in [1.01, 1.5] so the sum reaches
    dst // 2; a bicubic interpolating spline over that grid (SciPy's interp2d 'cubic' on a grid, i.e. an
    interpolating tensor-product spline) is read at the integer offsets -dst//2 .. dst//2."""
    from scipy.interpolate import RectBivariateSpline

    half = src // 2
    low, high = 1.01, 1.5
    while high - low > 1e-6:
        q = (low + high) / 2.0
        if (1.0 - q**half) / (1.0 - q) > dst // 2:
            high = q
        else:
            low = q
    right, position = [], 1.0
    for i in range(half):
        right.append(position)
        position += q ** (i + 1)
    axis = np.array([-r for r in reversed(right)] + [0.0] + right)
    wanted = np.arange(-(dst // 2), dst // 2 + 0.1, 1.0)
    return RectBivariateSpline(axis, axis, table, kx=3, ky=3, s=0)(wanted, wanted)


def test_relative_position_tables_grow_as_beit_segmentation_does():
    torch.manual_seed(0)
    old, new = (7, 7), (16, 16)  # 13 x 13 offsets -> 31 x 31 (e.g. 112 -> 256 px at patch 16)
    table = torch.randn(num_relative_distances(old), 3, dtype=torch.float64)
    grown = resize_rel_pos_table(table, old, new)
    assert grown.shape == (num_relative_distances(new), 3)
    torch.testing.assert_close(grown[-3:], table[-3:])  # cls rows kept
    offsets = grown[:-3].reshape(31, 31, 3)
    for h in range(3):
        reference = _official_rel_pos_resize(table[:-3, h].reshape(13, 13).numpy(), 13, 31)
        np.testing.assert_allclose(offsets[..., h].numpy(), reference, rtol=0, atol=1e-9)
    # near offsets keep their value: (0, 0) and (0, +1) are knots of the spline
    source = table[:-3].reshape(13, 13, 3)
    torch.testing.assert_close(offsets[15, 15], source[6, 6])
    torch.testing.assert_close(offsets[15, 16], source[6, 7])


def test_pyramid_blocks_and_strides():
    assert pyramid_blocks(12) == [3, 5, 7, 11] and pyramid_blocks(24) == [7, 11, 15, 23]
    assert pyramid_blocks(4) == [0, 1, 2, 3]
    encoder = VisionTransformer(preset("vit_tiny_cpu", depth=4, img_size=64))  # patch 8: 8 x 8 grid
    maps = ViTPyramid(encoder)(torch.randn(2, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(2, 64, 32, 32), (2, 64, 16, 16), (2, 64, 8, 8), (2, 64, 4, 4)]


def test_every_head_maps_any_image_size_to_logits_of_that_size():
    from mimkit.finetune.segmentation import SegmentationModel, SegmentationOptions

    for head in ("upernet", "linear", "mask_transformer"):
        encoder = VisionTransformer(preset("vit_tiny_cpu", img_size=32))
        opts = SegmentationOptions(head=head, crop_size=32, channels=16, aux_channels=8, mask_dim=32, mask_heads=4)
        model = SegmentationModel(encoder, opts, num_classes=6)
        out, aux = model(torch.randn(2, 3, 32, 32), with_aux=True)
        (out.sum() + (aux.sum() if aux is not None else 0)).backward()
        assert (aux is not None) == (head == "upernet") and out.shape[:2] == (2, 6)
        assert all(p.grad is not None for p in model.parameters()), head  # DDP needs every parameter used
        assert model.eval()(torch.randn(1, 3, 45, 27)).shape == (1, 6, 45, 27)


def test_an_unknown_task_or_head_is_refused_naming_the_key(tmp_path):
    from mimkit.config import ConfigError

    with pytest.raises(ConfigError, match="'task'.*'segmentaton'.*did you mean 'segmentation'"):
        load_finetune_config(TINY, ["task=segmentaton"])
    with pytest.raises(ValueError, match="options.head must be one of .* got 'uper'"):
        check_config(load_finetune_config(TINY, ["options.head=uper"]))


# ---- data --------------------------------------------------------------------------------------------
def test_shards_hold_the_same_samples_as_the_folder(demo, tmp_path):
    pairs = ade_pairs(str(demo.ade_root), "val")
    write_segmentation_shards(pairs, tmp_path / "shards", maxcount=5, prefix="val")
    index, members = shard_pairs(str(tmp_path / "shards"))
    assert len(index.shards) == 3 and len(members) == len(pairs) == demo.num_val
    pipeline = SegPipeline(32, [128, 32], [0.5, 2.0], 0.75, 0.5, True, True, [0.5] * 3, [0.25] * 3)
    folder = SegmentationSamples(pairs, pipeline, train=True, seed=3)
    shards = SegmentationSamples(members, pipeline, train=True, seed=3, index=index)
    for i in (0, len(pairs) - 1):
        a, b = folder[i], shards[i]
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["image"], b["image"])
        assert a["image"].shape == (3, 32, 32) and set(a["label"].unique().tolist()) <= {0, 1, 2, 3, 255}
    # the shared shard reader: gzipped shards are streamed and spooled, a truncated one keeps its whole samples
    import gzip
    import shutil

    for i, path in enumerate(sorted((tmp_path / "shards").glob("*.tar"))):
        data = path.read_bytes()
        if i == 2:
            (tmp_path / "shards" / path.name).write_bytes(data[:1536])  # cut inside its first sample: nothing whole is left
        else:
            with gzip.open(tmp_path / "shards" / f"{path.stem}.tar.gz", "wb") as f:
                f.write(data)
            path.unlink()
    index, mixed = shard_pairs(str(tmp_path / "shards"))
    assert index.spool is not None and len(mixed) == 10 and len(pairs) > 10
    streamed = SegmentationSamples(mixed, pipeline, train=True, seed=3, index=index)
    assert torch.equal(streamed[7]["image"], folder[7]["image"]) and torch.equal(streamed[7]["label"], folder[7]["label"])
    shutil.rmtree(tmp_path / "shards")
    first = folder[0]["image"]
    assert torch.equal(folder[0]["image"], first)  # seeded per (seed, epoch, index)
    folder.set_epoch(1)
    assert not torch.equal(folder[0]["image"], first)


# ---- training ----------------------------------------------------------------------------------------
def _step0_miou(cfg) -> float:
    accelerator = make_accelerator(cfg)
    set_seed(cfg.run.seed)  # as train() does before building: the same initial weights
    task = check_config(cfg)
    built = task.build_model()
    _, val_loader = task.build_loaders(built.encoder.cfg.img_size, accelerator)
    return task.evaluate(built.model.to(accelerator.device), val_loader, accelerator)["mIoU"]


def test_a_short_finetune_lifts_miou_and_writes_its_tables(demo, tmp_path):
    # from scratch, so the easy part of the task: the background as a fifth class (no zero-label reduction)
    overrides = ["run.name=lift", "options.head=linear", "optim.max_steps=120", "data.batch_size=16", "optim.lr=5e-3",
                 "optim.layer_decay=null", "model.drop_path=0", "options.reduce_zero_label=false", "data.num_classes=5",
                 "options.class_names=[other,circle,square,triangle,star]"]
    before = _step0_miou(_cfg(tmp_path, demo, *overrides))
    result = train(_cfg(tmp_path, demo, *overrides))
    assert result["count"] == demo.num_val and result["steps"] == 120
    assert result["mIoU"] > before + 3, (before, result["mIoU"])
    table = json.loads((tmp_path / "lift" / "per_class_iou.json").read_text())
    assert table["classes"][1] == "circle" and len(table["IoU"]) == 5 and table["mIoU"] == result["mIoU"]
    assert (tmp_path / "lift" / "per_class_iou.txt").read_text().startswith("class")
    assert (tmp_path / "lift" / "pictures" / "segmentation.png").stat().st_size > 0


def test_two_processes_give_the_same_metrics_as_one(demo, tmp_path):
    args = [f"run.root={tmp_path}", f"data.root={demo.ade_root}", "optim.max_steps=6", "model.drop_path=0.0",
            "options.dropout=0.0"]  # no randomness drawn per process
    one = train(load_finetune_config(TINY, [*args, "run.name=one"]))
    run_torchrun(ENTRY, ["--config", str(TINY), *args, "run.name=two"], cwd=tmp_path, timeout=300)
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["num_processes"] == 2 and one["num_processes"] == 1 and two["count"] == one["count"] == demo.num_val
    for key in ("mIoU", "mAcc", "aAcc"):  # SyncBatchNorm + split batches: the same training, to float error
        assert two[key] == pytest.approx(one[key], abs=0.05), key


def _losses(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_a_preempted_run_resumes_and_repeats_the_uninterrupted_losses(demo, tmp_path):
    # drop path, dropout and augmentation on: the RNG states and the per-sample seeds must come back
    common = ["optim.max_steps=10", "run.log_every=1", "data.batch_size=16", "model.drop_path=0.1"]
    straight = train(_cfg(tmp_path, demo, "run.name=straight", *common))
    with pytest.raises(Preempted):  # SIGUSR1 to this process after step 8 (mid-epoch: 6 steps per epoch)
        train(_cfg(tmp_path, demo, "run.name=cut", "debug.signal_at_step=8", *common))
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text() == "epoch_0001_step_00000008"
    resumed = train(_cfg(tmp_path, demo, "run.name=cut", *common))
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "cut")
    assert sorted(b) == list(range(1, 11)) and b == a  # exact: fp32, augmentation seeded per sample and epoch
    assert resumed["mIoU"] == straight["mIoU"]
