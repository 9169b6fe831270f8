"""`data.mode: decode_on_device`: the workers read JPEG headers only and send the encoded bytes; the device
transform decodes the batch with `torchvision.io.decode_jpeg` (here on the CPU: no GPU on the test machine,
the same call takes device="cuda" there), crops, resizes and finishes as device mode. Compared with device
mode on the same shards: same keys, shapes, dtypes, the same crop boxes / flips / jitter (one draw path), and
pixels that differ only by the decoder."""

from __future__ import annotations

import io
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit_test_distributed import write_tar  # tests/distributed.py, registered by conftest.py
from mimkit.data.masking import BlockMasks
from mimkit.data.stream import DataConfig, build_stream
from mimkit.data.transforms import SecondView, resize_through_float, resize_uint8
from mimkit.errors import BadValue
TOKENIZER_VIEW = SecondView(size=16)
MASKS = BlockMasks((2, 2), 2, min_block=1)
# Both paths decode with libjpeg-turbo (PIL's and torchvision's builds, the same integer IDCT): on this
# machine the normalised pixels agree exactly (mean difference 0.0). The bound allows another build or
# nvJPEG on a GPU (a level or two of 255 per pixel, about 0.01-0.03 after dividing by std * 255) and still
# fails on a wrong box, flip or jitter (a dropped flip gives 0.45).
MEAN_ABS_TOLERANCE = 0.05


def photo_like(seed: int, size=(56, 44), mode="RGB") -> bytes:
    """A smooth gradient with noise: JPEG-friendly content, unlike pure noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([x * 255 / size[0], y * 255 / size[1], (x + y) * 128 / sum(size)], -1)
    arr = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(out, format="JPEG", quality=90)
    return out.getvalue()


def png(size=(56, 44)) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def make_shards(folder, counts: list[int]) -> str:
    n = 0
    for s, count in enumerate(counts):
        write_tar(folder / f"s-{s:03d}.tar", [(f"s{s}_{i}", {"jpg": photo_like(n + i)}) for i in range(count)])
        n += count
    return str(folder / f"s-{{000..{len(counts) - 1:03d}}}.tar")


def small_config(shards: str, **kw) -> DataConfig:
    return DataConfig(**{**dict(shards=shards, batch_size=2, num_workers=0, batches_per_epoch=6, image_size=32,
                                shuffle_buffer=4, return_keys=True), **kw})


def take(loader, n: int) -> list[dict]:
    return list(itertools.islice(loader, n))


def both_modes(shards: str, **kw):
    """(device mode, decode_on_device) loaders of one config."""
    return [build_stream(small_config(shards, mode=mode, **kw), masks=MASKS, second_view=TOKENIZER_VIEW)
            for mode in ("device", "decode_on_device")]


def finished(loader, n: int) -> list[dict]:
    return [loader.device_transform(b) for b in take(loader, n)]


def test_decode_on_device_batches_match_device_mode(tmp_path):
    samples = [(f"k{i}", {"jpg": photo_like(i, mode="L" if i % 4 == 3 else "RGB")}) for i in range(12)]
    write_tar(tmp_path / "a.tar", samples)
    # use_draft=False: device mode's draft() would decode big photos at reduced scale; the device decodes
    # in full (at these sizes draft() never applies anyway)
    device, on_device = both_modes(str(tmp_path / "a.tar"), batches_per_epoch=4, batch_size=3,
                                   use_draft=False, color_jitter=0.4)
    raws = take(on_device, 4)
    assert all(raw["jpeg_sizes"].gt(0).all() and raw["decoded"].numel() == 0 for raw in raws)  # no decode in workers
    flips = torch.cat([raw["flip"] for raw in raws])
    assert flips.any() and not flips.all()  # both kinds of sample, so the comparison sees the flip applied
    for a, b in zip(finished(device, 4), [on_device.device_transform(raw) for raw in raws]):
        assert list(a) == list(b)
        assert a["key"] == b["key"]
        for key in ("mask", "ids_keep", "label", "skipped_by"):
            assert torch.equal(a[key], b[key]), key
        for key in ("image", "image_tok"):
            assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype == torch.float32
            assert (a[key] - b[key]).abs().mean() < MEAN_ABS_TOLERANCE, key


def test_same_seed_same_batches_and_resume_continues_the_stream(tmp_path):
    cfg = small_config(make_shards(tmp_path, [7, 5, 9]), mode="decode_on_device", num_workers=2,
                       batches_per_epoch=6)
    loader = build_stream(cfg, masks=MASKS, second_view=TOKENIZER_VIEW)
    batches = iter(loader)
    first = [next(batches) for _ in range(3)]
    state = loader.state_dict()
    expected = [next(batches) for _ in range(3)]
    again = take(build_stream(cfg, masks=MASKS, second_view=TOKENIZER_VIEW), 6)
    resumed = build_stream(cfg, masks=MASKS, second_view=TOKENIZER_VIEW)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for a, b in zip(first + expected, again[:6]):
        assert a["key"] == b["key"] and all(torch.equal(a[k], b[k]) for k in ("jpeg", "box", "flip", "jitter", "mask"))
    for a, b in zip(expected, take(resumed, 3)):
        assert a["key"] == b["key"]
        out_a, out_b = loader.device_transform(a), resumed.device_transform(b)
        assert torch.equal(out_a["image"], out_b["image"]) and torch.equal(out_a["image_tok"], out_b["image_tok"])


def test_png_and_cmyk_fall_back_to_the_worker_and_corrupt_jpegs_are_counted(tmp_path, caplog):
    good = photo_like(0)
    # whole header and end marker, no scan data: PIL and libjpeg-turbo both refuse it, the header parse does not
    corrupt_body = good[:good.index(b"\xff\xda")] + b"\xff\xd9"
    samples = [(f"good{i}", {"jpg": photo_like(i + 1)}) for i in range(8)]
    samples += [("png", {"png": png()}), ("cmyk", {"jpg": photo_like(9, mode="CMYK")}),
                ("truncated", {"jpg": good[:300]}), ("corrupt", {"jpg": corrupt_body})]
    write_tar(tmp_path / "mixed.tar", samples)  # bad ones last: a rescue reading the shard from its start finds good ones
    device, on_device = both_modes(str(tmp_path / "mixed.tar"), batches_per_epoch=4, batch_size=3,
                                   shuffle_buffer=1)  # in shard order: one pass, each sample once
    raws = take(on_device, 4)  # one pass over the 12 samples
    fallback = [k.split("/")[1] for b in raws for k, n in zip(b["key"], b["decoded_sizes"].tolist()) if n > 0]
    assert sorted(fallback) == ["cmyk", "png"]
    skipped_by = torch.zeros_like(raws[0]["skipped_by"])
    for raw in raws:
        out = on_device.device_transform(raw)
        assert out["image"].shape == (3, 3, 32, 32) and torch.isfinite(out["image"]).all()
        skipped_by += out["skipped_by"]
    assert "rejected a JPEG" in caplog.text  # the corrupt body: the device decoder refused it
    device_batches = take(device, 4)
    device_skips = sum(b["skipped_by"] for b in device_batches)
    # device mode skips both bad JPEGs in the worker; decode_on_device skips the truncated one there and
    # counts the corrupt one when the device rejects it (a grey stand-in keeps the batch whole)
    assert skipped_by.tolist() == device_skips.tolist() and int(skipped_by.sum()) == 2
    assert on_device.skipped_by.tolist() == device.skipped_by.tolist()
    keys = {k.split("/")[1] for b in raws for k in b["key"]}
    assert {"png", "cmyk", "corrupt"} <= keys and "truncated" not in keys


def test_float_resize_of_the_gpu_path_stays_within_one_level_of_the_uint8_kernel():
    # GPUs have no uint8 antialiased resize: there the crop is resized in float and rounded; run that path
    # on CPU tensors (standing in for the GPU) against the CPU's uint8 kernel.
    x = torch.from_numpy(np.array(Image.open(io.BytesIO(photo_like(3))))).permute(2, 0, 1).contiguous()
    for mode in ("bicubic", "bilinear"):
        a, b = resize_uint8(x, 32, mode), resize_through_float(x, 32, mode)
        assert a.dtype == b.dtype == torch.uint8
        assert (a.int() - b.int()).abs().max() <= 1


def test_bad_mode_and_interpolation_are_one_line_user_errors(tmp_path):
    shards = make_shards(tmp_path, [2])
    with pytest.raises(BadValue, match=r"^data\.mode=gpu: expected one of worker, device, decode_on_device$"):
        build_stream(small_config(shards, mode="gpu"))
    with pytest.raises(BadValue, match=r"^data\.interpolation=lanczos: data\.mode=decode_on_device"):
        build_stream(DataConfig(shards=shards, mode="decode_on_device", interpolation="lanczos"))
