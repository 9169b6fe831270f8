"""COCO data and evaluation for detection: category ids with gaps mapped to labels and back, crowd regions
never targets, images without annotations dropped or kept, large-scale jitter seeded per (seed, epoch, image),
and COCOeval on ground truth given back as detections (AP 1) and on a case computed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from mimkit.data.demo import make_demo_data
from mimkit.finetune.coco_data import Categories, CocoInstances, boxes_from_masks, read_coco
from mimkit.finetune.coco_eval import STAT_NAMES, coco_scores, results_for_image

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp("demo") / "data", num_classes=4, images_per_class=3,
                          val_per_class=3, image_size=64)


def _dataset(demo, split="train", **kw):
    images, ann = (demo.coco_train_images, demo.coco_train_json) if split == "train" else \
        (demo.coco_val_images, demo.coco_val_json)
    kw = {"train": split == "train", "size": 64, "mean": MEAN, "std": STD} | kw
    return CocoInstances(images, ann, **kw)


def test_category_ids_with_gaps_map_to_contiguous_labels_and_back(demo):
    cats = Categories.from_coco(read_coco(demo.coco_val_json))
    assert cats.ids == (1, 2, 4, 7)  # the demo's ids have gaps on purpose
    assert [cats.label(i) for i in cats.ids] == [1, 2, 3, 4]  # 0 is the background
    assert [cats.category_id(k) for k in (1, 2, 3, 4)] == [1, 2, 4, 7]
    ds = _dataset(demo, scale_range=(1.0, 1.0), hflip=0.0)
    for index in range(len(ds)):
        _, target = ds[index]
        anns = ds.coco.imgToAnns[target["image_id"]]
        assert sorted(cats.category_id(int(k)) for k in target["labels"]) == sorted(a["category_id"] for a in anns)


def test_without_jitter_targets_are_the_json_masks_and_boxes(demo):
    ds = _dataset(demo, scale_range=(1.0, 1.0), hflip=0.0)  # 64 px images into 64 px: identity
    image, target = ds[0]
    anns = ds.coco.imgToAnns[target["image_id"]]
    assert image.shape == (3, 64, 64) and target["size"].tolist() == [64, 64]
    masks = torch.from_numpy(np.stack([ds.coco.annToMask(a) for a in anns]))
    assert torch.equal(target["masks"], masks)
    xywh = torch.tensor([a["bbox"] for a in anns])
    assert torch.allclose(target["boxes"], torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1))
    pixels = np.asarray(ds.load_image(target["image_id"]), dtype=np.float32) / 255.0
    assert torch.allclose(image, (torch.from_numpy(pixels).permute(2, 0, 1) - 0.5) / 0.25, atol=1e-5)


def test_jitter_is_seeded_per_epoch_and_image_and_boxes_follow_masks(demo):
    ds = _dataset(demo, seed=3)
    a, b = ds[1], ds[1]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["masks"], b[1]["masks"])
    ds.set_epoch(1)
    c = ds[1]
    assert not torch.equal(a[0], c[0])
    seen = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for index in range(len(ds)):
            image, t = ds[index]
            h, w = t["size"].tolist()
            seen.add((h, w))
            assert image.shape == (3, 64, 64) and h <= 64 and w <= 64
            assert image[:, h:].abs().sum() == 0 and image[:, :, w:].abs().sum() == 0  # padding
            assert torch.equal(t["boxes"], boxes_from_masks(t["masks"]))
            assert (t["masks"].flatten(1).sum(1) > 0).all()  # objects cropped away are dropped
    assert min(seen) < (32, 32) and (64, 64) in seen  # shrunk (factor < 0.5) and cropped (factor > 1)


def _crowd_dataset(root: Path, keep_empty: bool) -> CocoInstances:
    (root / "images").mkdir(parents=True, exist_ok=True)
    rle = lambda m: {k: (v.decode() if k == "counts" else v)  # noqa: E731
                     for k, v in mask_utils.encode(np.asfortranarray(m)).items()}
    images, anns = [], []
    for image_id in (1, 2):
        Image.fromarray(np.full((32, 48, 3), 100 * image_id, np.uint8)).save(root / "images" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": 32, "width": 48})
        crowd = np.zeros((32, 48), np.uint8)
        crowd[:10, :10] = 1
        anns.append({"id": 10 * image_id, "image_id": image_id, "category_id": 5, "iscrowd": 1,
                     "segmentation": rle(crowd), "area": 100.0, "bbox": [0, 0, 10, 10]})
    # image 1 also holds a polygon object; image 2 only a crowd region
    anns.append({"id": 3, "image_id": 1, "category_id": 9, "iscrowd": 0, "area": 64.0, "bbox": [20, 20, 8, 8],
                 "segmentation": [[20, 20, 28, 20, 28, 28, 20, 28]]})
    ann = root / "instances.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": [
        {"id": 5, "name": "crowd-thing"}, {"id": 9, "name": "thing"}]}))
    return CocoInstances(root / "images", ann, train=True, size=48, mean=MEAN, std=STD, scale_range=(1, 1),
                         hflip=0.0, keep_empty=keep_empty)


def test_crowd_regions_are_never_targets_and_empty_images_follow_the_switch(tmp_path):
    dropped = _crowd_dataset(tmp_path, keep_empty=False)
    assert dropped.image_ids == [1]
    _, target = dropped[0]
    assert target["labels"].tolist() == [2]  # category 9, label 2; the crowd region (category 5) is not there
    assert target["masks"].shape == (1, 48, 48) and target["masks"][0, :10, :10].sum() == 0
    assert target["boxes"].tolist() == [[20.0, 20.0, 28.0, 28.0]]
    kept = _crowd_dataset(tmp_path, keep_empty=True)
    assert kept.image_ids == [1, 2]
    _, empty = kept[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["masks"].shape == (0, 48, 48)


def test_coco_eval_of_the_ground_truth_given_back_is_one(demo):
    coco = read_coco(demo.coco_val_json)
    cats = Categories.from_coco(coco)
    records = []
    for image_id in sorted(coco.imgs):
        anns = coco.imgToAnns[image_id]
        xywh = torch.tensor([a["bbox"] for a in anns])
        masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])).bool()
        labels = torch.tensor([cats.label(a["category_id"]) for a in anns])  # labels, mapped back inside
        records += results_for_image(image_id, torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                                     torch.linspace(0.9, 0.5, len(anns)), labels, masks, cats)
    scores, summary = coco_scores(coco, records, sorted(coco.imgs))
    for kind in ("bbox", "segm"):
        assert scores[f"{kind}/AP"] == pytest.approx(1.0) and scores[f"{kind}/AP50"] == pytest.approx(1.0)
        assert scores[f"{kind}/AR100"] == pytest.approx(1.0)
    assert "Average Precision" in summary and len([k for k in scores if k.startswith("bbox/")]) == len(STAT_NAMES)


def test_coco_eval_equals_a_case_computed_by_hand(tmp_path):
    """Two objects; detections: the first exactly (0.9), a miss elsewhere (0.8), the second never found.
    Precision is 1 up to recall 0.5 and nothing after: COCO's 101 recall points give AP = 51 / 101 at every
    IoU threshold; AR100 = 0.5. A detection of a category with no object (8) is not scored (COCO: -1, left out)."""
    images = [{"id": 1, "file_name": "1.png", "height": 100, "width": 100}]
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20], "area": 400.0, "iscrowd": 0,
             "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [60, 60, 30, 30], "area": 900.0, "iscrowd": 0,
             "segmentation": [[60, 60, 90, 60, 90, 90, 60, 90]]}]
    ann = tmp_path / "gt.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns,
                               "categories": [{"id": 3, "name": "a"}, {"id": 8, "name": "b"}]}))
    coco = read_coco(ann)
    cats = Categories.from_coco(coco)
    records = results_for_image(1, torch.tensor([[10.0, 10, 30, 30], [40, 0, 60, 20], [60, 60, 90, 90]]),
                                torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1, 1, 2]), None, cats)
    assert [r["category_id"] for r in records] == [3, 3, 8]
    scores, _ = coco_scores(coco, records, [1], iou_types=("bbox",))
    assert scores["bbox/AP"] == pytest.approx(51 / 101) and scores["bbox/AP50"] == pytest.approx(51 / 101)
    assert scores["bbox/AR100"] == pytest.approx(0.5) and scores["bbox/AR1"] == pytest.approx(0.5)
    assert scores["bbox/APl"] == -1.0  # no object above 96^2 px: COCO's -1
    nothing, _ = coco_scores(coco, [], [1])
    assert nothing["bbox/AP"] == 0.0 and nothing["segm/AP"] == 0.0
