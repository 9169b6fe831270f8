"""The shard stream: resume, per-rank / per-worker streams, bad samples, equal batch counts."""

import io
import itertools
import json
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit_test_distributed import write_tar  # tests/distributed.py, registered by conftest.py
from mimkit.data.masking import BlockMasks
from mimkit.data.stream import DataConfig, build_stream, expand_shards
from mimkit.data.transforms import SecondView


def jpeg(seed: int, size=(40, 32), mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    out = io.BytesIO()
    img.save(out, format="JPEG")
    return out.getvalue()


def png16(size=(40, 32)) -> bytes:
    ramp = np.linspace(0, 65535, size[0] * size[1]).reshape(size[1], size[0]).astype(np.uint16)
    out = io.BytesIO()
    img = Image.fromarray(ramp)
    assert img.mode.startswith("I;16")
    img.save(out, format="PNG")
    return out.getvalue()


def make_shards(folder, counts: list[int], prefix="s") -> str:
    """Shards of good samples with unique keys `PREFIX<shard>_<i>`; returns the brace pattern."""
    n = 0
    for s, count in enumerate(counts):
        samples = []
        for i in range(count):
            samples.append((f"{prefix}{s}_{i}", {"jpg": jpeg(n), "cls": str(n % 5).encode()}))
            n += 1
        write_tar(folder / f"{prefix}-{s:03d}.tar", samples)
    return str(folder / f"{prefix}-{{000..{len(counts) - 1:03d}}}.tar")


TOKENIZER_VIEW = SecondView(size=16)


def small_config(shards: str, **kw) -> DataConfig:
    base = dict(shards=shards, batch_size=2, num_workers=0, batches_per_epoch=6, image_size=32,
                shuffle_buffer=4, return_keys=True)
    base.update(kw)
    return DataConfig(**base)


def take(loader, n: int) -> list[dict]:
    return list(itertools.islice(loader, n))


BLOCK_MASKS = BlockMasks((2, 2), 2, min_block=1)  # drawn per batch in the worker, seeded by the stream


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_same_remaining_batches(tmp_path, workers):
    cfg = small_config(make_shards(tmp_path, [7, 5, 9, 6]), num_workers=workers, batches_per_epoch=8)
    loader = build_stream(cfg, masks=BLOCK_MASKS, second_view=TOKENIZER_VIEW)
    batches = iter(loader)  # one uninterrupted pass: the state is read while it runs
    [next(batches) for _ in range(3)]
    state = loader.state_dict()
    assert state["epoch"] == 0 and state["batch"] == 3
    expected = [next(batches) for _ in range(3)]

    resumed = build_stream(cfg, masks=BLOCK_MASKS, second_view=TOKENIZER_VIEW)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    got = take(resumed, 3)
    for a, b in zip(expected, got):
        assert a["key"] == b["key"]
        for k in ("image", "image_tok", "mask", "ids_keep", "label"):
            assert torch.equal(a[k], b[k]), k
    # a differently seeded stream differs
    other = build_stream(small_config(cfg.shards, seed=1, num_workers=workers, batches_per_epoch=8))
    assert [b["key"] for b in take(other, 6)] != [b["key"] for b in take(build_stream(cfg), 6)]


def test_resume_across_an_epoch_boundary(tmp_path):
    cfg = small_config(make_shards(tmp_path, [6, 6]), batches_per_epoch=3)
    loader = build_stream(cfg)
    first = [b["key"] for b in loader] + [b["key"] for b in take(loader, 2)]
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batch"] == 2
    fresh = build_stream(cfg)
    assert [b["key"] for b in fresh] == first[:3]
    assert [b["key"] for b in take(fresh, 1)] == first[3:4]  # the next epoch's first batch
    assert first[3] != first[0]  # epochs differ
    resumed = build_stream(cfg)
    resumed.load_state_dict({"epoch": 1, "batch": 1, "seed": 0})
    assert [b["key"] for b in take(resumed, 1)] == first[4:]


def test_ranks_and_workers_get_disjoint_equal_streams(tmp_path):
    # 8 shards of 6, 2 ranks x 2 workers = 4 slots; each slot reads at most 2 shards this epoch
    cfg = small_config(make_shards(tmp_path, [6] * 8), num_workers=2, batches_per_epoch=4)
    slots = {}
    for rank in range(2):
        batches = list(build_stream(cfg, rank=rank, world_size=2))
        assert len(batches) == 4
        for i, batch in enumerate(batches):
            assert batch["image"].shape == (2, 3, 32, 32)
            slots.setdefault((rank, i % 2), []).extend(batch["key"])  # worker i % W served batch i
    assert len(slots) == 4 and all(len(keys) == 4 for keys in slots.values())
    seen = [k for keys in slots.values() for k in keys]
    assert len(seen) == len(set(seen)), "a sample was served to two slots"


def test_replacement_sampling_gives_distinct_rank_streams(tmp_path):
    cfg = small_config(make_shards(tmp_path, [5] * 6), resample="replacement")
    keys = [[k for b in build_stream(cfg, rank=r, world_size=2) for k in b["key"]] for r in range(2)]
    assert len(keys[0]) == len(keys[1]) == 12 and keys[0] != keys[1]


def test_uneven_shards_give_equal_batch_counts(tmp_path):
    cfg = small_config(make_shards(tmp_path, [1, 3, 20]), num_workers=2, batches_per_epoch=5, batch_size=3)
    for rank in range(3):
        loader = build_stream(cfg, rank=rank, world_size=3)
        for _ in range(2):  # two epochs
            batches = list(loader)
            assert len(batches) == 5 and all(b["label"].shape == (3,) for b in batches)
        assert loader.state_dict()["epoch"] == 2


def test_bad_samples_are_skipped_counted_and_good_ones_delivered(tmp_path):
    good = {
        "rgb": {"jpg": jpeg(1), "cls": b"1"},
        "cmyk": {"jpg": jpeg(2, mode="CMYK"), "cls": b"2"},
        "grey": {"jpg": jpeg(3, mode="L"), "cls": b"3"},
        "deep": {"png": png16(), "cls": b"4"},
        "pngasjpg": {"jpg": png16(), "cls": b"0"},  # a PNG behind a .jpg name: decoded by content
    }
    bad = {
        "empty": {"jpg": b"", "cls": b"1"},
        "text": {"jpg": b"this is not a jpeg at all", "cls": b"1"},
        "nolabel": {"jpg": jpeg(4)},  # require_label=True
        "nojpg": {"cls": b"1"},
        "cut": {"jpg": jpeg(5)[:300], "cls": b"1"},  # truncated JPEG data
    }
    samples = list(good.items()) + list(bad.items())
    write_tar(tmp_path / "mixed.tar", samples)
    # a truncated tar: the first two samples are whole, the third is cut inside its .jpg
    write_tar(tmp_path / "whole.tar", [(f"t{i}", {"cls": b"1", "jpg": jpeg(10 + i)}) for i in range(3)])
    with tarfile.open(tmp_path / "whole.tar") as tar:
        cut = tar.getmember("t2.jpg").offset_data + 100
    (tmp_path / "truncated.tar").write_bytes((tmp_path / "whole.tar").read_bytes()[:cut])
    (tmp_path / "whole.tar").unlink()

    cfg = small_config(f"{tmp_path}/mixed.tar::{tmp_path}/truncated.tar", weights=[1.0, 1.0],
                       require_label=True, batches_per_epoch=10, batch_size=3, shuffle_buffer=2)
    loader = build_stream(cfg)
    keys, counted = set(), 0
    for batch in loader:
        assert batch["image"].shape == (3, 3, 32, 32) and torch.isfinite(batch["image"]).all()
        keys.update(k.split("/")[1] for k in batch["key"])
        counted += int(batch["skipped"])
    assert set(good) | {"t0", "t1"} <= keys
    assert not keys & (set(bad) | {"t2"})
    assert counted == loader.skipped >= len(bad)


def test_device_mode_batches_are_uint8_until_the_device_transform(tmp_path):
    cfg = small_config(make_shards(tmp_path, [8]), mode="device", batches_per_epoch=2)
    loader = build_stream(cfg, masks=BLOCK_MASKS, second_view=TOKENIZER_VIEW)
    batch = next(iter(loader))
    assert batch["image"].dtype == torch.uint8 and batch["image_tok"].shape == (2, 3, 16, 16)
    out = loader.device_transform(batch)
    assert out["image"].dtype == torch.float32 and "flip" not in out and "jitter" not in out
    assert out["mask"].shape == (2, 4) and out["mask"].dtype == torch.bool


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        expand_shards(str(tmp_path / "missing-{0..1}.tar"))
    shards = make_shards(tmp_path, [2])
    with pytest.raises(ValueError, match="weights"):
        build_stream(small_config(shards, weights=[1.0, 2.0]))
    with pytest.raises(ValueError, match="mode"):
        build_stream(small_config(shards, mode="gpu"))
    loader = build_stream(small_config(shards))
    with pytest.raises(ValueError, match="seed"):
        loader.load_state_dict({"epoch": 0, "batch": 1, "seed": 5})


# ---- where shards are: pipe:, .tar.gz, http(s) and s3 through fsspec ------------------------------


def gzip_copy(src, dst) -> None:
    import gzip

    dst.write_bytes(gzip.compress(src.read_bytes()))


@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on 127.0.0.1 serving `tmp_path/www` (http.server in a thread)."""
    import functools
    import http.server
    import threading

    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_pipe_gzip_and_http_sources_stream_with_weights(tmp_path, http_root):
    """Three sources, each another kind of shard: `pipe:cat` over local tars, gzip-compressed tars on
    disk (.tar.gz and .tgz), and tars served over HTTP by a real server (fsspec's HTTP filesystem reads
    https:// the same way; this machine has no certificate authority for a TLS server). Every sample of
    every source comes out, decoded, in the proportions the weights ask for."""
    www, url = http_root
    make_shards(tmp_path, [4, 4], prefix="p")
    make_shards(tmp_path, [4, 4], prefix="g")
    gzip_copy(tmp_path / "g-000.tar", tmp_path / "g-000.tar.gz")
    gzip_copy(tmp_path / "g-001.tar", tmp_path / "g-001.tgz")
    make_shards(www, [4, 4], prefix="h")
    # a shard larger than a read block, from a server without range requests: read as one stream
    write_tar(www / "h-002.tar", [(f"h2_{i}", {"jpg": jpeg(90 + i), "bin": np.random.bytes(1_500_000)})
                                  for i in range(2)])
    spec = (f"pipe:cat {tmp_path}/p-{{000..001}}.tar::{tmp_path}/g-000.tar.gz::{tmp_path}/g-001.tgz"
            f"::{url}/h-{{000..002}}.tar")
    assert [len(s) for s in expand_shards(spec)] == [2, 1, 1, 3]
    cfg = small_config(spec, weights=[3.0, 1.0, 1.0, 1.0], batches_per_epoch=24, batch_size=4, shuffle_buffer=8)
    seen = []
    for batch in build_stream(cfg):
        assert torch.isfinite(batch["image"]).all() and int(batch["skipped"]) == 0
        seen += [k.split("/")[1] for k in batch["key"]]
    by_prefix = {p: sum(k.startswith(p) for k in seen) for p in "pgh"}
    expected = {f"{p}{s}_{i}" for p in "pgh" for s in (0, 1) for i in range(4)} | {"h2_0", "h2_1"}
    assert set(seen) == expected
    assert 0.35 < by_prefix["p"] / len(seen) < 0.7 and by_prefix["p"] > max(by_prefix["g"], by_prefix["h"])  # 1/2


def test_failing_pipe_and_missing_url_are_skipped_counted_and_retried(tmp_path, http_root):
    """A command that dies half-way through its tar (exit 3, a message on stderr) and a URL that does not
    exist: both are skipped and counted by reason, retried later in the epoch (`shard_retries`), and the
    epoch still yields every batch; the good shard's samples all come out."""
    www, url = http_root
    make_shards(tmp_path, [6], prefix="ok")
    make_shards(tmp_path, [6], prefix="cut")
    half = (tmp_path / "cut-000.tar").stat().st_size // 2
    spec = (f"{tmp_path}/ok-000.tar::pipe:head -c {half} {tmp_path}/cut-000.tar; echo connection reset >&2; exit 3"
            f"::{url}/missing-000.tar")
    cfg = small_config(spec, weights=[1.0, 1.0, 1.0], batches_per_epoch=20, batch_size=3, shard_retries=1)
    loader = build_stream(cfg)
    keys = set()
    for batch in loader:
        keys.update(k.split("/")[1] for k in batch["key"])
    by = loader.state_dict()["skipped_by"]
    assert by["pipe failed"] >= 2 and by["unreadable shard"] >= 2 and by["truncated tar"] == 0
    assert {f"ok0_{i}" for i in range(6)} <= keys and "cut0_0" in keys  # the first half of the cut shard
    assert loader.state_dict()["batch"] == 0 and loader.state_dict()["epoch"] == 1  # the epoch ended normally
    # retries: a source whose every shard fails is read 1 + shard_retries times per failure, not forever
    from mimkit.data.sources import read_shard

    reasons = []
    list(read_shard(spec.split("::")[1], lambda: True, lambda r, d: reasons.append((r, d))))
    assert reasons[0][0] == "pipe failed" and "exited with status 3" in reasons[0][1]
    assert "connection reset" in reasons[0][1]


def test_pretraining_reads_no_labels_and_class_names_map_through_classes_json(tmp_path):
    """Class-name labels (`.cls` "circle", `.txt` as webdataset users write them) never cost pretraining a
    sample (it parses no label); a stage asking for labels maps them through classes.json beside the shards."""
    samples = [(f"n{i}", {"jpg": jpeg(i), "cls": [b"circle", b"square"][i % 2]}) for i in range(4)]
    samples += [(f"t{i}", {"PNG": _png(i), "txt": [b"square", b"circle"][i % 2]}) for i in range(4)]
    write_tar(tmp_path / "named-000.tar", samples)
    cfg = small_config(str(tmp_path / "named-000.tar"), batches_per_epoch=4, batch_size=2)
    loader = build_stream(cfg)
    assert all(int(b["skipped"]) == 0 and (b["label"] == -1).all() for b in loader)
    (tmp_path / "classes.json").write_text(json.dumps(["circle", "square"]))
    labelled = build_stream(small_config(cfg.shards, batches_per_epoch=12, batch_size=2, require_label=True))
    labels = {}
    for batch in labelled:
        assert int(batch["skipped"]) == 0
        labels.update(zip((k.split("/")[1] for k in batch["key"]), batch["label"].tolist()))
    expected = {**{f"n{i}": i % 2 for i in range(4)}, **{f"t{i}": 1 - i % 2 for i in range(4)}}
    assert labels.items() <= expected.items() and len(labels) >= 6


def _png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg(seed))).save(out, format="PNG")
    return out.getvalue()


def test_epoch_length_from_sizes_json_or_num_samples(tmp_path, capsys):
    shards = make_shards(tmp_path, [5, 7])
    (tmp_path / "sizes.json").write_text(json.dumps({"s-000.tar": 5, "s-001.tar": 7}))
    assert len(build_stream(small_config(shards, batches_per_epoch=0, batch_size=2), world_size=2, rank=0)) == 3
    assert "12 samples (sizes.json" in capsys.readouterr().out
    assert len(build_stream(small_config(shards, batches_per_epoch=0, num_samples=40, batch_size=2))) == 20
    (tmp_path / "sizes.json").unlink()
    assert len(build_stream(small_config(shards, batches_per_epoch=0))) == 1000
    assert "the default" in capsys.readouterr().out


def test_a_stalled_or_lingering_pipe_never_hangs_the_stream(tmp_path, monkeypatch):
    """A command that stops sending mid-tar, and one that sends a whole tar but never exits: each is
    killed after `PIPE_STALL_S` (shortened here), counted as a failed pipe, and the epoch goes on."""
    from mimkit.data import sources

    monkeypatch.setattr(sources, "PIPE_STALL_S", 0.5)
    make_shards(tmp_path, [6], prefix="ok")
    make_shards(tmp_path, [6], prefix="cut")
    half = (tmp_path / "cut-000.tar").stat().st_size // 2
    reasons = []
    stalled = f"pipe:head -c {half} {tmp_path}/cut-000.tar; sleep 60"
    lingering = f"pipe:cat {tmp_path}/ok-000.tar; sleep 60"
    start = time.monotonic()
    for spec in (stalled, lingering):
        keys = [s["__key__"] for s in sources.read_shard(spec, lambda: True, lambda r, d: reasons.append((r, d)))]
        assert keys and (spec == stalled or len(keys) == 6)
    assert time.monotonic() - start < 10
    assert [r for r, _ in reasons] == ["pipe failed", "pipe failed"]
    assert "sent nothing for 0.5 s" in reasons[0][1] and "sent nothing for 0.5 s" in reasons[1][1]


def test_a_failed_stream_is_retried_later_up_to_the_limit(tmp_path):
    """A pipe shard that always fails is read again RETRY_AFTER shards later, `shard_retries` times and no
    more (each run of the command leaves a line in a file); a failed local tar is never retried (it
    would fail the same way)."""
    from mimkit.data.stream import RETRY_AFTER, EpochStream, WorkerStream

    good = make_shards(tmp_path, [2], prefix="g").replace("{000..000}", "000")
    calls = tmp_path / "calls.txt"
    failing = f"pipe:echo run >> {calls}; exit 1"
    (tmp_path / "bad.tar").write_bytes(b"not a tar" * 100)
    for retries, expected in ((2, 3), (0, 1)):
        calls.write_text("")
        cfg = small_config(good, shard_retries=retries)
        worker = WorkerStream(EpochStream(cfg, [[good]], [1.0], lambda img: {}, None, 0, 1, 0, 0), 0)
        samples = list(worker._raw(iter([failing, str(tmp_path / "bad.tar")] + [good] * (3 * RETRY_AFTER))))
        assert len(samples) == 2 * 3 * RETRY_AFTER
        assert len(calls.read_text().splitlines()) == expected
        assert worker.skips.counts == {"pipe failed": expected, "unreadable shard": 1}
def test_another_world_size_continues_the_epoch_by_samples(tmp_path):
    """2 ranks stop 2 batches into a 6-batch epoch (24 samples of 2 x 6 x 2); the rest (16 samples) is
    resampled on 1 rank: 8 fresh batches of 2, seeded (the same on every load), then ordinary epochs."""
    cfg = small_config(make_shards(tmp_path, [8, 8, 8]), batches_per_epoch=6)
    ranks = [build_stream(cfg, rank=r, world_size=2) for r in range(2)]
    for loader in ranks:
        take(loader, 2)
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict() and state["world_size"] == 2

    def one_rank():
        loader = build_stream(cfg, rank=0, world_size=1)
        loader.load_state_dict(state)
        return loader

    alone = one_rank()
    assert alone.batches_this_epoch == 8  # (24 - 2 x 2 x 2) / 2
    rest = [b["key"] for b in alone]
    assert len(rest) == 8 and alone.state_dict()["epoch"] == 1 and alone.state_dict()["batch"] == 0
    assert rest == [b["key"] for b in one_rank()]  # seeded: a second resume draws the same
    # fresh orders, not rank 0's unchanged stream continued (that would repeat what rank 0 serves next)
    assert rest[:2] != [b["key"] for b in take(ranks[0], 2)]
    fresh = build_stream(cfg, rank=0, world_size=1)
    epoch0 = [b["key"] for b in fresh]
    assert len(epoch0) == 6 and rest[:6] != epoch0  # not epoch 0 of a 1-rank run replayed from its start
    # ...and the resumed run's next epoch is an ordinary 1-rank epoch 1
    assert [b["key"] for b in take(alone, 1)] == [b["key"] for b in take(fresh, 1)]
    # back on 2 ranks mid-way through the resampled epoch: 16 - 3 x 2 = 10 samples left -> 3 batches each
    again = one_rank()
    take(again, 3)
    two = [build_stream(cfg, rank=r, world_size=2) for r in range(2)]
    for loader in two:
        loader.load_state_dict(again.state_dict())
    assert [len(list(loader)) for loader in two] == [3, 3] and two[0].state_dict()["epoch"] == 1
    # an unchanged world size keeps the exact position
    same = build_stream(cfg, rank=1, world_size=2)
    same.load_state_dict(state)
    assert [b["key"] for b in take(same, 2)] == [b["key"] for b in take(ranks[1], 2)]
