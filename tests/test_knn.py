"""k-NN monitoring (`mimkit.knn`): the weighted vote against a hand computation; `mimkit knn` on an export
(1 process, and 2 ranks over gloo) against the plain computation, on a foreign checkpoint, and its one-line
errors; pretrain's `knn` section refused at parse time. Elsewhere: the ZeRO-3 run in test_pretrain.py
(its last k-NN equals its export's) and the demo MAE's k-NN rising in test_pretrain_value.py."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch

import mimkit_test_distributed as _helper  # tests/distributed.py, registered by conftest.py
from mimkit.checkpoint.export_format import IMAGENET_MEAN, IMAGENET_STD, encoder_meta, pixel_norm, write_export
from mimkit.config import ConfigError
from mimkit.data.demo import make_demo_data
from mimkit.knn import KnnConfig, check_knn_config, knn_class_scores, rank_slice
from mimkit.metrics import topk_correct
from mimkit.models.vit import ViTConfig, VisionTransformer

ROOT = Path(__file__).resolve().parents[1]


def test_weighted_vote_equals_a_hand_computation():
    # 2-D features: cosine similarity is the cosine of the angle between them.
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [2.0, 0.1]])
    labels = torch.tensor([0, 1, 1, 2, 2])
    query = torch.tensor([[1.0, 0.2], [-1.0, 0.1]])
    T, k = 0.5, 3
    scores = knn_class_scores(train, labels, query, num_classes=3, k=k, temperature=T)

    # by hand, query 0 = (1, 0.2): cosines 0.9806 (#0, class 0), 0.1961 (#1), 0.8321 (#2, class 1),
    # -0.9806 (#3), 0.9891 (#4, class 2) -> the 3 nearest are #4, #0, #2
    n0 = math.hypot(1, 0.2)
    c0, c2, c4 = 1 / n0, (1 + 0.2) / (n0 * math.sqrt(2)), (2 + 0.02) / (n0 * math.hypot(2, 0.1))
    expected0 = [math.exp(c0 / T), math.exp(c2 / T), math.exp(c4 / T)]  # class 0, 1, 2
    # query 1 = (-1, 0.1): cosines -0.995 (#0), 0.0995 (#1), -0.6333 (#2), 0.995 (#3, class 2), -0.9938 (#4)
    # -> nearest #3 (class 2), #1 (class 1), #2 (class 1)
    n1 = math.hypot(1, 0.1)
    d1, d2, d3 = 0.1 / n1, (-1 + 0.1) / (n1 * math.sqrt(2)), 1 / n1
    expected1 = [0.0, math.exp(d1 / T) + math.exp(d2 / T), math.exp(d3 / T)]
    assert torch.allclose(scores, torch.tensor([expected0, expected1]), rtol=1e-5)
    # query 0: class 2 wins (e^1.978 = 7.23 beats e^1.961 = 7.11); query 1: class 2 (e^1.99 = 7.3 > e^0.2 + e^-1.27 = 1.5)
    assert scores.argmax(1).tolist() == [2, 2]
    assert topk_correct(scores, torch.tensor([0, 2]), ks=(1, 2)) == {1: 1, 2: 2}  # query 0's class 0 is 2nd
    # k larger than the train set: every train feature votes
    assert knn_class_scores(train, labels, query, 3, k=50, temperature=T).sum(1).allclose(
        torch.stack([(torch.nn.functional.normalize(q, dim=0) @ torch.nn.functional.normalize(train, dim=1).T / T)
                     .exp().sum() for q in query]))


def test_rank_slices_cover_each_index_once_with_equal_lengths():
    for n, world in ((7, 2), (1, 2), (8, 4), (5, 3)):
        slices = [rank_slice(n, r, world) for r in range(world)]
        assert len({len(idx) for idx, _ in slices}) == 1
        assert [i for idx, real in slices for i in idx[:real]] == list(range(n))


def test_config_errors_name_the_key_and_value(tmp_path):
    good = dict(train=str(tmp_path), val=str(tmp_path))
    for change, words in (({"k": 0}, "knn.k=0"), ({"temperature": 0.0}, "knn.temperature=0.0"),
                          ({"feature": "max"}, "knn.feature='max'"), ({"crop_pct": 1.5}, "knn.crop_pct=1.5"),
                          ({"val": str(tmp_path / "nope")}, "knn.val="), ({"train": ""}, "knn.train is empty")):
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(".", r"\.")):
            check_knn_config(KnnConfig(**{**good, **change}))
    with pytest.raises(ConfigError, match="knn.image_size=48: must be 0 or the encoder's input size 32"):
        check_knn_config(KnnConfig(image_size=48, **good), encoder_size=32)
    with pytest.raises(ConfigError, match="knn.feature='cls': needs an encoder with a class token"):
        check_knn_config(KnnConfig(feature="cls", **good), has_cls=False)


# ---- `mimkit knn` on an export: 1 process, 2 ranks, and the plain computation agree ------------------
@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """21 train / 15 val images of 3 classes at 32 px (odd counts: the 2-rank slices need padding), and a
    random tiny encoder's export."""
    root = tmp_path_factory.mktemp("knn")
    demo = make_demo_data(root / "data", num_classes=3, images_per_class=7, val_per_class=5, image_size=32,
                          images_per_shard=8)
    torch.manual_seed(0)
    vit = ViTConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, pos_embed="sincos", num_classes=0)
    # ImageNet's normalisation, what a foreign checkpoint is read with: the same weights give the same result
    meta = encoder_meta(vit, pixel_norm(list(IMAGENET_MEAN), list(IMAGENET_STD), 32, "bicubic"), method="mae",
                        tokenizer=None, teacher=None)
    export = write_export(root / "export", VisionTransformer(vit).state_dict(), meta)
    return root, demo, export


def expected_counts(export: Path, train: str, val: str, feature: str) -> list[int]:
    """Top-1 / top-5 hits by the plain route: every image in one batch, one process."""
    from mimkit.checkpoint.load import load_vit_export
    from mimkit.data.labelled import eval_transform, labelled_images
    from mimkit.knn import pooled_features

    encoder, info = load_vit_export(export)
    transform = eval_transform(32, info["mean"], info["std"])
    sets = [labelled_images(spec, transform) for spec in (train, val)]
    with torch.no_grad():
        feats = [pooled_features(encoder.eval(), torch.stack([s[i][0] for i in range(len(s))]), feature) for s in sets]
    labels = [torch.tensor(s.targets) for s in sets]
    scores = knn_class_scores(feats[0], labels[0], feats[1], 3, k=20, temperature=0.07)
    hits = topk_correct(scores, labels[1])
    return [hits[1], hits[5]]


@pytest.mark.parametrize("fmt,feature,ranks", [("imagefolder", "mean", (1, 2)), ("shards", "cls", (1,))])
def test_mimkit_knn_on_an_export_equals_the_plain_computation(labelled, capsys, fmt, feature, ranks):
    """Through the `mimkit` command, as a user runs it: in this process, and (ImageFolder) on 2 ranks."""
    from mimkit.cli import main as mimkit_main

    root, demo, export = labelled
    if fmt == "imagefolder":
        train, val = str(demo.imagefolder_train), str(demo.imagefolder_val)
    else:
        train, val = demo.train_shard_pattern, str(demo.val_shards_dir)
    args = [str(export), "--train", train, "--val", val, "--feature", feature, "--num-workers", "0", "--batch-size", "4"]
    one = root / f"one_{fmt}.json"
    assert mimkit_main(["knn", *args, "--out", str(one)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(one.read_text())
    assert (result["num_train"], result["num_val"], result["num_classes"]) == (21, 15, 3)
    top1, top5 = expected_counts(export, train, val, feature)
    assert result["knn_top1"] == pytest.approx(100 * top1 / 15) and result["knn_top5"] == 100.0
    assert f"top-1 {result['knn_top1']:.2f} %" in printed
    if 2 in ranks:
        two = root / f"two_{fmt}.json"
        proc = subprocess.run(_helper.torchrun_command("-m", ["mimkit", "knn", *args, "--out", str(two)]),
                              env=_helper.dist_env(), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-3000:]
        assert proc.stdout.count("k-NN ") == 1  # rank 0 prints
        assert json.loads(two.read_text())["knn_top1"] == result["knn_top1"]


def test_mimkit_knn_reads_a_foreign_checkpoint_with_a_preset(labelled, capsys):
    """The export's weights as an official-style torch file ({"model": state}, learned positions, no
    mimkit.json): `--preset` gives the architecture, and the result is the export's."""
    from mimkit.cli import main as mimkit_main

    root, demo, export = labelled
    from safetensors.torch import load_file

    foreign = root / "foreign.pth"
    torch.save({"model": load_file(export / "model.safetensors"), "epoch": 3}, foreign)
    sets = ["--train", str(demo.imagefolder_train), "--val", str(demo.imagefolder_val), "--num-workers", "0"]
    results = []
    for source in ([str(foreign), "--preset", "vit_tiny_cpu"], [str(export)]):
        out = root / f"{Path(source[0]).stem}.json"
        assert mimkit_main(["knn", *source, *sets, "--out", str(out)]) == 0
        results.append(json.loads(out.read_text())["knn_top1"])
    assert results[0] == results[1]
    assert "stay at their init" not in capsys.readouterr().err  # every encoder tensor was in the file


def test_mimkit_knn_errors_are_one_line(labelled, capsys):
    from mimkit.cli import main as mimkit_main

    root, demo, export = labelled
    folders = ["--train", str(demo.imagefolder_train), "--val", str(demo.imagefolder_val)]
    empty = root / "no_classes"
    empty.mkdir(exist_ok=True)
    cases = [([str(export), *folders, "--k", "0"], "mimkit knn: --k=0: must be >= 1"),
             ([str(export), *folders[:3], str(demo.val_shards_dir)], "one is an ImageFolder, the other tar shards"),
             ([str(root / "missing"), *folders], "no such file or folder"),
             ([str(export), "--train", str(empty), "--val", str(empty)], f"--train={str(empty)!r}: ")]
    for args, words in cases:
        assert mimkit_main(["knn", *args]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err


def test_pretrain_refuses_a_bad_knn_section_at_parse_time(tmp_path, capsys):
    from mimkit.pretrain.trainer import parse_args

    base = ["--config", str(ROOT / "configs" / "pretrain" / "mae_tiny_cpu.yaml"), "knn.every=10",
            f"knn.train={tmp_path}", f"knn.val={tmp_path}"]
    assert parse_args(base).knn.k == 20 and parse_args(base[:2]).knn.every == 0  # off by default
    for extra, words in ((["knn.k=0"], "knn.k=0: must be >= 1"), (["knn.every=-1"], "knn.every=-1: must be >= 0"),
                         (["knn.image_size=64"], "knn.image_size=64: must be 0 or the encoder's input size 32"),
                         (["model.class_token=false", "model.global_pool=avg", "knn.feature=cls"],
                          "knn.feature='cls': needs an encoder with a class token")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            parse_args(base + extra)
