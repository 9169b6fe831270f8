"""Views, draft() decoding, colour conversion, and the device transform matching the worker one."""

import io
import random

import numpy as np
import torch
from PIL import Image

from mimkit.data.transforms import (
    DALLE_MEAN, DALLE_STD, DecodeOnlyTransform, DeviceTransform, ViewTransform, crop_and_resize, sample_crop_box,
    to_rgb,
)


def photo_jpeg(width=256, height=192) -> bytes:
    """A smooth image (gradients + a disc), so downscaling methods agree closely."""
    y, x = np.mgrid[0:height, 0:width]
    r = (x * 255 // width).astype(np.uint8)
    g = (y * 255 // height).astype(np.uint8)
    b = (((x - width / 2) ** 2 + (y - height / 2) ** 2 < (height / 3) ** 2) * 200).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(np.stack([r, g, b], -1)).save(out, format="JPEG", quality=95)
    return out.getvalue()


def opened(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_crop_boxes_stay_inside_and_follow_scale_and_ratio():
    random.seed(0)
    for _ in range(300):
        left, top, right, bottom = sample_crop_box(200, 100, (0.2, 0.5), (0.75, 1.333))
        assert 0 <= left < right <= 200 and 0 <= top < bottom <= 100
        w, h = right - left, bottom - top
        assert 0.18 <= w * h / 20000 <= 0.52 and 0.7 <= w / h <= 1.4
    # impossible ratio falls back to a centre crop of the allowed aspect
    assert sample_crop_box(400, 40, (0.9, 1.0), (1.0, 1.0)) == (180, 0, 220, 40)


def test_draft_decodes_at_reduced_scale_and_matches_full_decode():
    data = photo_jpeg()
    outputs = [(32, Image.Resampling.BICUBIC)]
    img = opened(data)
    drafted = np.asarray(crop_and_resize(img, (0, 0, 256, 192), outputs, use_draft=True)[0], dtype=float)
    assert img.size == (64, 48)  # 1/4 scale still covers a 32 px output
    full_img = opened(data)
    full = np.asarray(crop_and_resize(full_img, (0, 0, 256, 192), outputs, use_draft=False)[0], dtype=float)
    assert full_img.size == (256, 192)
    assert np.abs(drafted - full).mean() < 4.0
    # a small box needs the full resolution: no reduction
    small = opened(data)
    crop_and_resize(small, (10, 10, 50, 50), outputs, use_draft=True)
    assert small.size == (256, 192)


def test_to_rgb_converts_cmyk_grey_and_16_bit_without_clipping():
    deep = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert deep.mode.startswith("I;16")
    assert np.asarray(to_rgb(deep))[0, :, 0].tolist() == [0, 128, 255]
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]
    assert to_rgb(Image.new("L", (3, 3), 7)).mode == "RGB"
    assert to_rgb(Image.new("RGBA", (3, 3))).mode == "RGB"


def test_two_view_transform_shapes_and_dalle_map():
    t = ViewTransform(image_size=48, tok_size=24, color_jitter=0.0)
    out = t(opened(photo_jpeg()))
    assert out["image"].shape == (3, 48, 48) and out["image_tok"].shape == (3, 24, 24)
    # DALL-E's map sends [0, 1] to [0.1, 0.9]
    assert out["image_tok"].min() >= 0.1 - 1e-5 and out["image_tok"].max() <= 0.9 + 1e-5
    assert torch.allclose(torch.tensor(DALLE_MEAN) * -1 / torch.tensor(DALLE_STD), torch.full((3,), 0.1))
    single = ViewTransform(image_size=32, tok_size=None)(opened(photo_jpeg()))
    assert set(single) == {"image"}


def test_both_views_share_the_crop_and_flip():
    t = ViewTransform(image_size=32, tok_size=32, tok_interpolation="bicubic", color_jitter=0.0,
                      tok_mean=(0.485, 0.456, 0.406), tok_std=(0.229, 0.224, 0.225))
    random.seed(3)
    out = t(opened(photo_jpeg()))
    assert torch.allclose(out["image"], out["image_tok"])


def test_device_transform_reproduces_the_worker_transform():
    options = dict(image_size=32, tok_size=16, color_jitter=0.4, flip_prob=0.5)
    worker, decode = ViewTransform(**options), DecodeOnlyTransform(**options)
    data = [photo_jpeg(), photo_jpeg(200, 300)]
    expected, parts = [], []
    for i, d in enumerate(data * 3):
        random.seed(i)
        expected.append(worker(opened(d)))
        random.seed(i)
        parts.append(decode(opened(d)))
    assert parts[0]["image"].dtype == torch.uint8
    assert any(bool(p["flip"]) for p in parts) and not all(bool(p["flip"]) for p in parts)
    batch = {k: torch.stack([p[k] for p in parts]) for k in parts[0]}
    batch["label"] = torch.arange(len(parts))
    out = DeviceTransform(color_jitter=0.4)(batch)
    assert set(out) == {"image", "image_tok", "label"}
    for key in ("image", "image_tok"):
        # the worker jitters in uint8 (lookup tables), the device in float: equal up to rounding
        diff = (out[key] - torch.stack([e[key] for e in expected])).abs()
        assert diff.mean() < 0.01 and diff.max() < 0.1, (key, diff.mean(), diff.max())
    no_jitter = dict(options, color_jitter=0.0)
    random.seed(7)
    exact = ViewTransform(**no_jitter)(opened(data[1]))
    random.seed(7)
    part = DecodeOnlyTransform(**no_jitter)(opened(data[1]))
    batch = {k: v.unsqueeze(0) for k, v in part.items()}
    assert torch.allclose(DeviceTransform(color_jitter=0.0)(batch)["image"][0], exact["image"], atol=1e-5)


def test_jitter_changes_pixels_and_zero_jitter_does_not():
    random.seed(1)
    plain = ViewTransform(image_size=32, tok_size=None, color_jitter=0.0, flip_prob=0.0)(opened(photo_jpeg()))
    random.seed(1)
    jittered = ViewTransform(image_size=32, tok_size=None, color_jitter=0.4, flip_prob=0.0)(opened(photo_jpeg()))
    assert not torch.allclose(plain["image"], jittered["image"], atol=1e-2)


def test_tokenizer_view_from_the_image_view_is_close_to_the_direct_resize():
    data = photo_jpeg(320, 240)
    outputs = [(64, Image.Resampling.BICUBIC), (32, Image.Resampling.LANCZOS)]
    box = (20, 10, 260, 230)
    derived = np.asarray(crop_and_resize(opened(data), box, outputs, small_from_large=True)[1], dtype=float)
    direct = np.asarray(crop_and_resize(opened(data), box, outputs, small_from_large=False)[1], dtype=float)
    assert 0 < np.abs(derived - direct).mean() < 2.0
