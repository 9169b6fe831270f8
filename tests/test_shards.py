"""`mimkit shards`: ImageFolder / file list to tar shards, round trip through the reader."""

import io
import json
import tarfile

import numpy as np
from PIL import Image

from mimkit.cli import main as mimkit_main
from mimkit.data.shards import write_shards


def save_image(path, seed: int, mode="RGB", fmt="JPEG") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(out, format=fmt)
    path.write_bytes(out.getvalue())
    return out.getvalue()


def read_shards(folder) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                assert "/" not in m.name and not m.name.startswith(".")  # plain keys, nothing to escape
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def test_imagefolder_round_trip(tmp_path, capsys):
    root = tmp_path / "images"
    originals = {}
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(4):
            originals[f"{name}/{i}.jpg"] = save_image(root / name / f"{i}.jpg", 10 * c + i)
        save_image(root / name / "grey.png", 99 + c, mode="L", fmt="PNG")
        save_image(root / name / "cmyk.jpg", 50 + c, mode="CMYK")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (root / "cat" / "empty.jpg").write_bytes(b"")
    (root / "cat" / "notes.txt").write_text("ignored: not an image extension")

    out = tmp_path / "shards"
    rc = mimkit_main(["shards", "imagefolder", str(root), "--out", str(out), "--maxcount", "4", "--prefix", "train"])
    assert rc == 0
    report = capsys.readouterr()
    assert "skipped 2 undecodable" in report.err and "broken.jpg" in report.err and "empty.jpg" in report.err

    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"train-000000.tar": 4, "train-000001.tar": 4, "train-000002.tar": 4}
    assert json.loads((out / "classes.json").read_text()) == ["cat", "dog"]
    assert not list(out.glob("*.tmp"))
    samples = read_shards(out)
    assert len(samples) == 12
    classes = ["cat", "dog"]
    for s in samples.values():
        meta = json.loads(s["json"])
        assert meta["class"] == classes[int(s["cls"])] == meta["path"].split("/")[0]
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB"
        if meta["path"] in originals:  # RGB JPEGs pass through byte for byte
            assert s["jpg"] == originals[meta["path"]]
    assert "broken.jpg" not in {json.loads(s["json"])["path"].split("/")[-1] for s in samples.values()}


def test_filelist_with_and_without_labels(tmp_path):
    for i in range(3):
        save_image(tmp_path / f"{i}.jpg", i)
    (tmp_path / "list.txt").write_text("0.jpg\tzebra\n1.jpg\tant\n2.jpg\n")
    out = tmp_path / "out"
    assert mimkit_main(["shards", "filelist", str(tmp_path / "list.txt"), "--out", str(out), "--no-shuffle"]) == 0
    samples = read_shards(out)
    assert json.loads((out / "classes.json").read_text()) == ["ant", "zebra"]
    labels = {json.loads(s["json"])["path"].rsplit("/", 1)[-1]: s.get("cls") for s in samples.values()}
    assert labels == {"0.jpg": b"1", "1.jpg": b"0", "2.jpg": None}


def test_write_shards_api_from_memory_and_maxsize(tmp_path):
    images = [Image.new("RGB", (32, 24), (i * 20, 0, 0)) for i in range(6)]
    result = write_shards([(img, i % 2, f"gen{i}") for i, img in enumerate(images)] + [(b"junk", 0, "junk")],
                          tmp_path, maxcount=100, maxsize=3000, classes=["a", "b"], progress=False)
    assert result["written"] == 6 and [n for n, _ in result["skipped"]] == ["junk"]
    assert len(result["sizes"]) > 1 and sum(result["sizes"].values()) == 6  # split by size
    samples = read_shards(tmp_path)
    assert sorted(int(s["cls"]) for s in samples.values()) == [0, 0, 0, 1, 1, 1]


def test_parallel_encoding_gives_the_same_shards(tmp_path):
    items = []
    for i in range(5):
        save_image(tmp_path / f"{i}.png", i, fmt="PNG")
        items.append((str(tmp_path / f"{i}.png"), i))
    write_shards(items, tmp_path / "serial", progress=False)
    write_shards(items, tmp_path / "pool", workers=2, progress=False)
    assert (tmp_path / "serial" / "shard-000000.tar").read_bytes() == (tmp_path / "pool" / "shard-000000.tar").read_bytes()
