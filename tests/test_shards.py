"""`mimkit shards`: ImageFolder / file list to tar shards, round trip through the reader."""

import io
import json
import tarfile

import numpy as np
import pytest
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


def test_flat_folder_gives_unlabelled_shards_and_empty_input_exits_nonzero(tmp_path, capsys):
    flat = tmp_path / "flat"
    (flat / "more").mkdir(parents=True)  # a sub-folder without images is no class
    (flat / "empty_class").mkdir()
    for i in range(5):
        save_image(flat / f"{i}.jpg", i)
    save_image(flat / "more" / "x.png", 9, fmt="PNG")
    (flat / "empty_class" / "readme.txt").write_text("no images here")
    out = tmp_path / "shards"
    assert mimkit_main(["shards", "imagefolder", str(flat), "--out", str(out), "--workers", "2"]) == 0
    assert "6 samples (unlabelled)" in capsys.readouterr().out
    samples = read_shards(out)
    assert len(samples) == 6 and all(set(s) == {"jpg", "json"} for s in samples.values())
    assert json.loads((out / "sizes.json").read_text()) == {"shard-000000.tar": 6}
    assert not (out / "classes.json").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    assert mimkit_main(["shards", "imagefolder", str(empty), "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mimkit shards: no images in") and len(err.splitlines()) == 1
    (tmp_path / "list.txt").write_text("# nothing listed\n")
    assert mimkit_main(["shards", "filelist", str(tmp_path / "list.txt"), "--out", str(tmp_path / "none")]) == 2


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A local S3-compatible server (moto's server mode, in a thread on 127.0.0.1): no real S3 can be
    reached from this machine, so this stands in for it; s3fs and botocore talk to it over HTTP exactly
    as to S3 (AWS_ENDPOINT_URL)."""
    import socket

    import fsspec
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for key, value in dict(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
                           AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}").items():
        monkeypatch.setenv(key, value)
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir("bucket")
    yield "s3://bucket"
    server.stop()


def test_shards_written_to_s3_and_streamed_back(tmp_path, s3_endpoint, capsys):
    """`mimkit shards ... --out s3://bucket/set` uploads the shards and sizes.json; the stream reads the
    bucket folder back (listing through s3fs), takes its epoch length from sizes.json, and every sample
    comes out, in two DataLoader workers."""
    import fsspec
    from mimkit.data.stream import DataConfig, build_stream

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(10):
        save_image(flat / f"{i}.jpg", 100 + i)
    url = f"{s3_endpoint}/set"
    assert mimkit_main(["shards", "imagefolder", str(flat), "--out", url, "--maxcount", "4"]) == 0
    fs = fsspec.filesystem("s3")
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(url)) == [
        "shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "sizes.json"]
    capsys.readouterr()
    cfg = DataConfig(shards=f"{url}/", batch_size=2, num_workers=2, batches_per_epoch=0, image_size=32,
                     shuffle_buffer=4, return_keys=True)
    loader = build_stream(cfg)
    assert len(loader) == 5 and "10 samples (sizes.json" in capsys.readouterr().out
    keys = [k for batch in loader for k in batch["key"]]
    assert len(keys) == 10 and int(loader.skipped) == 0 and len(set(keys)) >= 6
