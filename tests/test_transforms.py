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


def photo_like_jpeg(width=500, height=375, seed=0) -> bytes:
    """Textured content (smooth shapes + noise + edges): where resize filters differ most."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // width), (y * 255 // height), ((x // 16 + y // 16) % 2) * 180], -1).astype(float)
    img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _pixels(out, key):
    """Normalised view back to 0..255 (ImageNet stats for "image", DALL-E map for "image_tok")."""
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) if key == "image" else torch.tensor(1.25)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1) if key == "image" else torch.tensor(-0.125)
    return (out[key] * std + mean) * 255


def test_torch_backend_matches_the_pil_reference_and_draws_the_same_randomness():
    """The fast path (torch uint8 resize, fused float jitter) against the all-PIL reference path: same
    boxes / flips / jitter (same random draws), pixels within a small mean difference, on plain-size
    photos, large ones (draft-reduced decode), tiny crops (upsampling) and no-jitter / jitter.

    With a draft()-reduced decode the torch path snaps the box to whole pixels of the reduced image
    (PIL resamples the fractional box): a shift under one original pixel, which on noisy texture is a
    large pixel difference, so that case uses smooth content."""
    cases = [(photo_like_jpeg(), {}), (photo_jpeg(1000, 750), {}), (photo_like_jpeg(320, 240, 2), {}),
             (photo_like_jpeg(), {"scale": (0.01, 0.02)}), (photo_like_jpeg(375, 500, 3), {"color_jitter": 0.0})]
    for data, extra in cases:
        options = dict(extra)
        for seed in range(4):
            results = {}
            for backend in ("torch", "pil"):
                random.seed(seed)
                results[backend] = ViewTransform(backend=backend, **options)(opened(data))
                results[backend + "_next"] = random.random()  # both consumed the same draws
            assert results["torch_next"] == results["pil_next"]
            for key, bound in (("image", 1.5), ("image_tok", 2.5)):
                fast, ref = _pixels(results["torch"], key), _pixels(results["pil"], key)
                assert fast.shape == ref.shape and fast.is_contiguous()
                diff = (fast - ref).abs()
                assert diff.mean() < bound, (extra, seed, key, diff.mean())


def test_torch_resize_is_close_to_pil_without_jitter_and_lanczos_stays_available():
    options = dict(color_jitter=0.0, flip_prob=0.0)
    data = photo_like_jpeg()
    outs = {}
    for name, kw in (("pil", dict(backend="pil")), ("approx", {}), ("lanczos", dict(tok_approx=False))):
        random.seed(5)
        outs[name] = ViewTransform(**options, **kw)(opened(data))
    image_diff = (_pixels(outs["approx"], "image") - _pixels(outs["pil"], "image")).abs().mean()
    assert image_diff < 0.3  # torch's antialiased bicubic is PIL's filter: rounding differences only
    assert torch.allclose(outs["approx"]["image"], outs["lanczos"]["image"])
    lanczos_diff = (_pixels(outs["lanczos"], "image_tok") - _pixels(outs["pil"], "image_tok")).abs().mean()
    approx_diff = (_pixels(outs["approx"], "image_tok") - _pixels(outs["pil"], "image_tok")).abs().mean()
    assert lanczos_diff < 0.3  # same PIL lanczos, from a 224 view within rounding of PIL's
    assert lanczos_diff < approx_diff < 3.0  # bicubic-antialias stand-in for lanczos: close, not equal


def test_jitter_normalise_matches_the_float_reference():
    from mimkit.data.transforms import apply_jitter, jitter_normalise, normalise

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8, generator=g)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    scale, shift = (1 / (255 * std)).view(3, 1, 1), (-mean / std).view(3, 1, 1)
    for factors, flip in (((1.3, 0.7, 1.2), False), ((0.6, 1.4, 0.6), True), ((1.0, 1.0, 1.0), False)):
        got = jitter_normalise(x.permute(1, 2, 0).contiguous().permute(2, 0, 1), factors, scale, shift, flip=flip)
        ref = x.float().div(255).unsqueeze(0)
        ref = ref.flip(-1) if flip else ref
        ref = normalise(apply_jitter(ref, torch.tensor([factors])), mean, std)[0]
        assert got.is_contiguous() and torch.allclose(got, ref, atol=1e-4), factors


def test_pil_backend_is_the_previous_path_and_unknown_backends_fail():
    random.seed(2)
    views, _, _ = ViewTransform(backend="pil", color_jitter=0.0)._sample(opened(photo_jpeg()))
    assert all(isinstance(v, Image.Image) for v in views)
    try:
        ViewTransform(backend="cuda")
    except ValueError:
        pass
    else:
        raise AssertionError("unknown backend accepted")
