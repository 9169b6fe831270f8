import io
import json
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from torchvision.datasets import ImageFolder

from mimkit.data.demo import STAMP_NAME, main, make_demo_data

# pycocotools 2.0.x calls np.array(copy=False) internally; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp("demo") / "data")


def _read_shards(paths):
    samples = defaultdict(dict)
    for shard in paths:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples[key][ext] = tar.extractfile(member).read()
    return samples


def _ade_pairs(demo, split):
    ade_split = {"train": "training", "val": "validation"}[split]
    images = sorted((demo.ade_root / "images" / ade_split).glob("*.jpg"))
    labels = [demo.ade_root / "annotations" / ade_split / (p.stem + ".png") for p in images]
    return images, labels


def test_imagefolder_is_readable_and_balanced(demo):
    train, val = ImageFolder(demo.imagefolder_train), ImageFolder(demo.imagefolder_val)
    assert sorted(train.classes) == sorted(demo.class_names) and len(demo.class_names) == 4
    assert len(train) == demo.num_train == 4 * 48 and len(val) == demo.num_val == 4 * 12
    assert set(Counter(train.targets).values()) == {48}
    assert set(Counter(val.targets).values()) == {12}
    image, _ = train[0]
    assert image.size == (64, 64) and image.mode == "RGB"


def test_shards_are_complete_webdataset_tars(demo):
    sizes = json.loads(demo.train_sizes.read_text())
    assert json.loads((demo.shards_dir / "classes.json").read_text()) == demo.class_names
    assert list(sizes) == [p.name for p in demo.train_shards]
    assert all(p.exists() for p in demo.train_shards)
    samples = _read_shards(demo.train_shards)
    assert sum(sizes.values()) == len(samples) == demo.num_train
    labels = []
    for key, sample in samples.items():
        assert set(sample) == {"jpg", "cls", "json"}, key
        label = int(sample["cls"].decode())
        assert json.loads(sample["json"])["class"] == demo.class_names[label]
        assert Image.open(io.BytesIO(sample["jpg"])).size == (64, 64)
        labels.append(label)
    assert set(Counter(labels).values()) == {48}
    # shards are not sorted by class, so a shard-level sampler still sees every class
    first = _read_shards(demo.train_shards[:1])
    assert len({int(s["cls"]) for s in first.values()}) == 4
    val = _read_shards(demo.val_shards)
    assert len(val) == demo.num_val == sum(json.loads(demo.val_sizes.read_text()).values())


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_masks_equal_segmentation_png(demo, split):
    coco = COCO(str(demo.coco_train_json if split == "train" else demo.coco_val_json))
    image_dir = demo.coco_train_images if split == "train" else demo.coco_val_images
    cat_ids = sorted(coco.getCatIds())
    assert cat_ids == demo.coco_category_ids == [1, 2, 4, 7]
    assert [coco.loadCats(c)[0]["name"] for c in cat_ids] == demo.class_names
    kinds = Counter(type(a["segmentation"]).__name__ for a in coco.loadAnns(coco.getAnnIds()))
    assert kinds["list"] > 0 and kinds["dict"] > 0  # polygons and RLE both present

    ade_images, ade_labels = _ade_pairs(demo, split)
    image_ids = sorted(coco.getImgIds())
    assert len(image_ids) == len(ade_images)
    for image_id, ade_image, ade_label in zip(image_ids, ade_images, ade_labels):
        info = coco.loadImgs(image_id)[0]
        # the same picture in both layouts
        assert (image_dir / info["file_name"]).read_bytes() == ade_image.read_bytes()
        seg = np.array(Image.open(ade_label))
        union = np.zeros_like(seg, dtype=bool)
        for k, cat_id in enumerate(demo.coco_category_ids, start=1):
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, catIds=[cat_id]))
            cat_mask = np.zeros_like(union)
            for ann in anns:
                m = coco.annToMask(ann).astype(bool)
                assert m.sum() == ann["area"] > 0
                x, y, w, h = ann["bbox"]
                ys, xs = np.nonzero(m)
                assert xs.min() >= x and xs.max() < x + w and ys.min() >= y and ys.max() < y + h
                assert not (m & union).any()  # objects never overlap
                cat_mask |= m
                union |= m
            assert np.array_equal(cat_mask, seg == k), (image_id, k)
        assert np.array_equal(union, seg > 0)


def test_ade_labels_use_zero_for_other_and_carry_the_image_class(demo):
    images, labels = _ade_pairs(demo, "train")
    # shard samples carry our sample key ("train000123": the 124th image) as their path
    shard_samples = {json.loads(s["json"])["path"]: s for s in _read_shards(demo.train_shards).values()}
    assert len(labels) == demo.num_train
    for i, (image_path, label_path) in enumerate(zip(images, labels)):
        label_image = Image.open(label_path)
        assert label_image.mode == "L"
        seg = np.array(label_image)
        assert seg.shape == (64, 64)
        assert set(np.unique(seg)) <= set(range(demo.num_classes + 1))
        assert (seg == 0).mean() > 0.3  # plenty of background ("other", ignored)
        # the image-level class is the largest object's class
        sample = shard_samples[f"train{i:06d}"]
        assert sample["jpg"] == image_path.read_bytes()
        areas = np.bincount(seg.ravel(), minlength=demo.num_classes + 1)[1:]
        cls = int(sample["cls"])
        assert areas[cls] > 0 and areas[cls] == areas.max()


def test_objects_stand_out_from_the_background(demo):
    # learnable signal: object pixels differ in colour from the pixels just outside them
    images, labels = _ade_pairs(demo, "val")
    contrasts = []
    for image_path, label_path in zip(images, labels):
        image = np.asarray(Image.open(image_path), dtype=float)
        seg = np.array(Image.open(label_path)) > 0
        p = np.pad(seg, 2)
        ring = np.zeros_like(seg)
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                ring |= p[2 + dy : 2 + dy + 64, 2 + dx : 2 + dx + 64]
        ring &= ~seg
        contrasts.append(np.abs(image[seg].mean(0) - image[ring].mean(0)).sum())
    assert np.median(contrasts) > 60


def _tree_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != STAMP_NAME}


def test_builds_are_deterministic_and_seeded(tmp_path):
    small = dict(images_per_class=3, image_size=48, val_per_class=1, images_per_shard=5)
    a = _tree_bytes(make_demo_data(tmp_path / "a", num_classes=3, seed=5, **small).root)
    b = _tree_bytes(make_demo_data(tmp_path / "b", num_classes=3, seed=5, **small).root)
    c = _tree_bytes(make_demo_data(tmp_path / "c", num_classes=3, seed=6, **small).root)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert len([k for k in a if k.endswith(".tar")]) == 3  # 9 train images in shards of 5, 3 val
    assert any(a[k] != c[k] for k in a if k.endswith(".jpg"))


def test_stamp_skips_rebuild_and_new_parameters_rebuild(tmp_path):
    root = tmp_path / "data"
    small = dict(num_classes=2, images_per_class=2, image_size=32, val_per_class=1)
    make_demo_data(root, **small)
    (root / "marker").write_text("kept while the parameters match")
    make_demo_data(root, **small)
    assert (root / "marker").exists()
    paths = make_demo_data(root, **{**small, "images_per_class": 3})
    assert not (root / "marker").exists()
    assert len(ImageFolder(paths.imagefolder_train)) == 6
    assert not list(tmp_path.glob(".data.*"))  # no build or trash folders left behind


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("not demo data")
    with pytest.raises(FileExistsError):
        make_demo_data(tmp_path, num_classes=2, images_per_class=1, val_per_class=1, image_size=32)
    assert (tmp_path / "mine.txt").exists()


def test_main_builds_data(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--num-classes", "5", "--images-per-class", "2", "--val-per-class", "1", "--image-size", "32"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["class_names"] == ["circle", "square", "triangle", "star", "cross"]
    assert len(ImageFolder(out / "imagefolder" / "train")) == 10
