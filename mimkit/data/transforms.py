"""Pretraining views of an image: one random-resized crop box, one or two resized views.

Two ways to run the same augmentation:

* worker mode (`ViewTransform`): the data worker decodes, crops, resizes, flips, jitters and
  normalises; the batch holds float tensors ready for the model.
* device mode (`DecodeOnlyTransform` + `DeviceTransform`): the worker only decodes, crops and resizes
  to fixed-size uint8 tensors and draws the per-sample flip / jitter factors; the training device
  applies them batched. uint8 batches are 4x smaller to move and the float work leaves the CPU.
* decode-on-device mode (`HeaderOnlyTransform` + `DeviceDecodeTransform`), for a GPU the CPUs cannot
  feed: the worker reads only the JPEG header (for the size the crop box needs) and sends the encoded
  bytes; the device decodes the batch in one `torchvision.io.decode_jpeg` call (nvJPEG on a GPU), crops,
  resizes, then finishes as device mode. Images it cannot take (not JPEG, CMYK, no end marker) are
  decoded in the worker as device mode does. All three modes draw the same numbers (`_CropViews._draw`).

Both decode JPEGs with PIL's `draft()` (DCT-domain downscale by 1/2, 1/4 or 1/8) whenever the crop
box is large enough that the reduced image still covers the output size, then crop+resize in one
`Image.resize(size, box=...)` call. On photos above ~500 px this skips most of the decode work; at
ImageNet's 500 x 375 a 224 px view rarely allows it, and the savings come from jittering the small
views in uint8 and deriving the tokenizer view from the image view (numbers in BENCHMARKS.md).

The default `backend="torch"` cuts the box with PIL's crop and resizes it with torch's antialiased uint8
kernels (`crop_and_resize_tensors`), derives the tokenizer view from the image view with torch's
antialiased bicubic (`tok_approx`; PIL lanczos with `tok_approx=False`) and applies flip, jitter and
normalisation as one float pass (`jitter_normalise`). `backend="pil"` is the previous all-PIL path;
both draw the same random numbers, so they augment the same boxes.

Randomness comes from Python's `random` module (boxes, flips, jitter factors): the stream seeds it per
batch, so a batch's augmentation is reproducible from (seed, rank, worker, epoch, batch index).
Both views of a sample share the crop box and flip, as in BEiT; jitter factors are shared too.
"""

from __future__ import annotations

import logging
import math
import random
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageStat
import torch.nn.functional as nnf
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DALL-E's pixel map x -> 0.8 x + 0.1 written as (x - mean) / std: mean = -0.125, std = 1.25.
DALLE_MEAN = (-0.125, -0.125, -0.125)
DALLE_STD = (1.25, 1.25, 1.25)

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}

Box = tuple[int, int, int, int]  # left, top, right, bottom in pixels of the original image


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode; 16-bit and 32-bit grey are rescaled, not clipped to white."""
    if img.mode == "RGB":
        img.load()
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(values * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return img.convert("RGB")  # L, LA, P, RGBA, CMYK, YCbCr, 1


def sample_crop_box(
    width: int, height: int, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3)
) -> Box:
    """RandomResizedCrop's box: area fraction in `scale`, log-uniform aspect in `ratio`, 10 tries,
    then the largest centre crop whose aspect fits `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * random.uniform(scale[0], scale[1])
        aspect = math.exp(random.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = random.randint(0, width - w)
            top = random.randint(0, height - h)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def draft_for_box(img: Image.Image, box: Box, largest: int) -> bool:
    """Ask a JPEG to decode at the smallest DCT scale (1/2, 1/4, 1/8) that keeps `box` at least `largest`
    pixels on each side, so no view is upsampled because of it. True when the decode scale changed."""
    if img.format != "JPEG":
        return False
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    request = (max(1, math.ceil(img.width * largest / max(crop_w, 1))),
               max(1, math.ceil(img.height * largest / max(crop_h, 1))))
    return img.draft(img.mode, request) is not None


def crop_and_resize(
    img: Image.Image, box: Box, outputs: Sequence[tuple[int, Image.Resampling]], use_draft: bool = True,
    small_from_large: bool = True,
) -> list[Image.Image]:
    """Square views of `box` at each (size, interpolation); decodes `img` (opened, not yet loaded).

    draft() is asked for the smallest reduction that keeps the box at least as large as the biggest
    output, so no view is upsampled because of it. With `small_from_large`, smaller views are resized
    from the first (largest) view instead of the box: for BEiT's 112 px lanczos view from a 224 px one
    this halves its cost and changes pixels by about 0.4 / 255 on average (measured on photos).
    """
    fbox = tuple(float(v) for v in box)
    full_w = img.width
    if use_draft and draft_for_box(img, box, max(size for size, _ in outputs)):
        factor = img.width / full_w  # 1, 1/2, 1/4 or 1/8 (rounded up sizes)
        fbox = tuple(v * factor for v in fbox)
    rgb = to_rgb(img)
    first = rgb.resize((outputs[0][0],) * 2, outputs[0][1], box=fbox)
    views = [first]
    for size, interp in outputs[1:]:
        if small_from_large and size <= outputs[0][0]:
            views.append(first.resize((size, size), interp))
        else:
            views.append(rgb.resize((size, size), interp, box=fbox))
    return views


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """[3, H, W] uint8 from an RGB image."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


# Interpolations torch resizes in uint8 with antialias (AVX2 kernels, PIL's filters: bicubic a = -0.5).
TORCH_MODES = {"bilinear": "bilinear", "bicubic": "bicubic"}


def _uint8_hwc(img: Image.Image) -> torch.Tensor:
    """[H, W, 3] uint8 tensor over a copy of an RGB image's pixels (read-only numpy memory)."""
    with warnings.catch_warnings():  # torch warns that the array is not writable; nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(img))


def resize_uint8(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """[3, h, w] uint8 (any strides; channels-last is fastest) -> [3, size, size] uint8, antialiased."""
    if x.shape[1] == size and x.shape[2] == size:
        return x
    return nnf.interpolate(x.unsqueeze(0), size=(size, size), mode=mode, antialias=True)[0]


def crop_and_resize_tensors(
    img: Image.Image, box: Box, outputs: Sequence[tuple[int, str]], use_draft: bool = True,
    small_from_large: bool = True, tok_approx: bool = True,
) -> list[torch.Tensor]:
    """`crop_and_resize` with torch's uint8 antialiased resize: [3, S, S] uint8 views (channels-last strides).

    Same draft() decision; the box (in the drafted image's pixels, rounded to whole pixels when draft
    scaled it) is cut with PIL's crop (copies only the box) and resized by `torch.nn.functional.interpolate`
    (`antialias=True`), 5-7x faster than PIL's resize on this machine and within ~0.02 / 255 of it
    on average for bicubic. Interpolations torch lacks (lanczos, box, nearest) go through PIL, except a
    smaller view derived from the first one with `tok_approx`, which uses torch's antialiased bicubic
    (about 1.2 / 255 mean difference from PIL's lanczos at 224 -> 112; see BENCHMARKS.md).
    """
    full_w, full_h = img.width, img.height
    if use_draft and draft_for_box(img, box, max(size for size, _ in outputs)) and img.width != full_w:
        fx, fy = img.width / full_w, img.height / full_h
        left, top = round(box[0] * fx), round(box[1] * fy)
        box = (left, top, max(left + 1, min(img.width, round(box[2] * fx))),
               max(top + 1, min(img.height, round(box[3] * fy))))
    rgb = to_rgb(img)
    full = box == (0, 0, rgb.width, rgb.height)
    crop = _uint8_hwc(rgb if full else rgb.crop(box)).permute(2, 0, 1)  # [3, h, w], channels-last strides
    views: list[torch.Tensor] = []
    for size, interp in outputs:
        derived = bool(views) and small_from_large and size <= outputs[0][0]
        source = views[0] if derived else crop
        if interp in TORCH_MODES or (derived and tok_approx):
            views.append(resize_uint8(source, size, TORCH_MODES.get(interp, "bicubic")))
        else:  # through PIL (lanczos, box, nearest)
            src = Image.fromarray(source.permute(1, 2, 0).contiguous().numpy(), "RGB")
            views.append(_uint8_hwc(src.resize((size, size), INTERPOLATIONS[interp])).permute(2, 0, 1))
    return views


_GREY = (0.299, 0.587, 0.114)


def jitter_normalise(x: torch.Tensor, factors: Sequence[float], scale: torch.Tensor, shift: torch.Tensor,
                     flip: bool = False) -> torch.Tensor:
    """[3, H, W] uint8 -> contiguous float `jitter(x / 255) * 255 * scale + shift`, flipped if asked.

    The float maths of `apply_jitter` (brightness -> contrast -> saturation, clamped after each) on the
    0..255 scale, in place on one float copy of the small view; the normalisation is the last op.
    """
    out = torch.empty(x.shape, dtype=torch.float32)
    out.copy_(x.flip(-1) if flip else x)  # uint8 -> float into a contiguous [3, H, W]
    bright, contrast, sat = factors
    if bright != 1.0:
        out.mul_(bright).clamp_(max=255.0)
    if contrast != 1.0:
        m = out.mean((1, 2))
        mean = float(m[0]) * _GREY[0] + float(m[1]) * _GREY[1] + float(m[2]) * _GREY[2]
        out.mul_(contrast).add_(mean * (1.0 - contrast)).clamp_(0.0, 255.0)
    if sat != 1.0:
        grey = out[0] * (_GREY[0] * (1.0 - sat))
        grey.add_(out[1], alpha=_GREY[1] * (1.0 - sat)).add_(out[2], alpha=_GREY[2] * (1.0 - sat))
        out.mul_(sat).add_(grey).clamp_(0.0, 255.0)
    return out.mul_(scale).add_(shift)


def sample_jitter(strength: float) -> tuple[float, float, float]:
    """Brightness, contrast, saturation factors, each uniform in [1 - s, 1 + s] (no hue, as BEiT)."""
    if strength <= 0:
        return (1.0, 1.0, 1.0)
    lo, hi = max(0.0, 1 - strength), 1 + strength
    return (random.uniform(lo, hi), random.uniform(lo, hi), random.uniform(lo, hi))


def apply_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Colour jitter on float images in [0, 1]. x [B, 3, H, W], factors [B, 3] (bright, contrast, sat).

    Fixed order brightness -> contrast -> saturation (torchvision shuffles the order per call).
    """
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    f = factors.to(x.dtype).view(-1, 3, 1, 1)
    x = (x * f[:, 0:1]).clamp_(0, 1)
    mean = (x * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = ((x - mean) * f[:, 1:2] + mean).clamp_(0, 1)
    grey = (x * weights).sum(1, keepdim=True)
    return ((x - grey) * f[:, 2:3] + grey).clamp_(0, 1)


def jitter_pil(img: Image.Image, factors: Sequence[float]) -> Image.Image:
    """`apply_jitter` on an 8-bit RGB image with lookup tables and a blend (worker mode): about 4x
    cheaper than the float version per sample; equal up to uint8 rounding of the intermediate steps."""
    bright, contrast, sat = factors
    if bright != 1.0:
        img = img.point([min(255, int(v * bright + 0.5)) for v in range(256)] * 3)
    if contrast != 1.0:
        mean = ImageStat.Stat(img.convert("L")).mean[0]
        img = img.point([min(255, max(0, int((v - mean) * contrast + mean + 0.5))) for v in range(256)] * 3)
    if sat != 1.0:
        img = Image.blend(img.convert("L").convert("RGB"), img, sat)  # clipped to [0, 255]
    return img


@dataclass
class SecondView:
    """A second view of each crop, at another size and normalisation (BEiT's tokenizer view, set by the
    tokenizer export): the stream adds it to every batch as "image_tok"."""

    size: int
    interpolation: str = "lanczos"
    mean: Sequence[float] = DALLE_MEAN
    std: Sequence[float] = DALLE_STD


def normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std with mean, std [3] broadcast over [B, 3, H, W]."""
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


class _CropViews:
    """Shared setup: crop parameters and the list of (key, size, interpolation) views."""

    def __init__(
        self,
        image_size: int = 224,
        tok_size: int | None = 112,
        interpolation: str = "bicubic",
        tok_interpolation: str = "lanczos",
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        flip_prob: float = 0.5,
        color_jitter: float = 0.4,
        use_draft: bool = True,
        tok_from_image: bool = True,
        backend: str = "torch",
        tok_approx: bool = True,
    ):
        if backend not in ("torch", "pil"):
            raise ValueError(f"backend must be 'torch' or 'pil', got '{backend}'")
        self.views = [("image", image_size, INTERPOLATIONS[interpolation])]
        self.modes = [interpolation]
        if tok_size:
            self.views.append(("image_tok", tok_size, INTERPOLATIONS[tok_interpolation]))
            self.modes.append(tok_interpolation)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.flip_prob, self.color_jitter, self.use_draft = flip_prob, color_jitter, use_draft
        self.tok_from_image = tok_from_image  # tokenizer view resized from the ViT view (see crop_and_resize)
        # "torch": uint8 tensor resize + fused float jitter / normalise; "pil": the reference PIL path
        self.backend = backend
        # torch backend, tokenizer view derived from the ViT view: torch's antialiased bicubic instead
        # of an interpolation torch lacks (lanczos); False keeps PIL's lanczos (slower, see BENCHMARKS.md)
        self.tok_approx = tok_approx

    def _draw(self, img: Image.Image) -> tuple[Box, bool, tuple[float, float, float]]:
        """Crop box, flip and jitter factors, drawn in that order (both backends draw the same)."""
        box = sample_crop_box(img.width, img.height, self.scale, self.ratio)
        flip = random.random() < self.flip_prob
        return box, flip, sample_jitter(self.color_jitter)

    def _sample(self, img: Image.Image) -> tuple[list[Image.Image], bool, tuple[float, float, float]]:
        """Crop box, flip and jitter factors (drawn in that order), and the decoded PIL views."""
        box, flip, jitter = self._draw(img)
        outputs = [(size, interp) for _, size, interp in self.views]
        return crop_and_resize(img, box, outputs, self.use_draft, self.tok_from_image), flip, jitter

    def _sample_tensors(self, img: Image.Image) -> tuple[list[torch.Tensor], bool, tuple[float, float, float]]:
        """`_sample` with [3, S, S] uint8 tensor views (torch backend)."""
        box, flip, jitter = self._draw(img)
        outputs = [(size, mode) for (_, size, _), mode in zip(self.views, self.modes)]
        views = crop_and_resize_tensors(img, box, outputs, self.use_draft, self.tok_from_image, self.tok_approx)
        return views, flip, jitter


class ViewTransform(_CropViews):
    """Worker mode: PIL image (opened, not loaded) -> {"image", ["image_tok"]} float, normalised.

    With `tok_size` it is BEiT's two-view transform (ViT view bicubic, tokenizer view e.g. 112 px
    lanczos with the tokenizer's own mean / std, by default DALL-E's 0.8 x + 0.1 map); with
    `tok_size=None` the single-view MAE / MILAN transform.
    """

    def __init__(self, *args, mean=IMAGENET_MEAN, std=IMAGENET_STD, tok_mean=DALLE_MEAN, tok_std=DALLE_STD, **kw):
        super().__init__(*args, **kw)
        # uint8 -> normalised float in one op: x * scale + shift, scale = 1 / (255 std), shift = -mean / std
        self.affine = {}
        for key, m, sd in (("image", mean, std), ("image_tok", tok_mean, tok_std)):
            m, sd = torch.tensor(m, dtype=torch.float32), torch.tensor(sd, dtype=torch.float32)
            self.affine[key] = ((1 / (255 * sd)).view(3, 1, 1), (-m / sd).view(3, 1, 1))

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        if self.backend == "torch":
            views, flip, jitter = self._sample_tensors(img)
            if self.color_jitter <= 0:
                jitter = (1.0, 1.0, 1.0)
            return {key: jitter_normalise(view, jitter, *self.affine[key], flip=flip)
                    for (key, _, _), view in zip(self.views, views)}
        views, flip, jitter = self._sample(img)
        out = {}
        for (key, _, _), view in zip(self.views, views):
            if flip:
                view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if self.color_jitter > 0:
                view = jitter_pil(view, jitter)
            scale, shift = self.affine[key]
            out[key] = torch.addcmul(shift, pil_to_uint8(view).float(), scale)
        return out


class DecodeOnlyTransform(_CropViews):
    """Device mode, worker half: PIL image -> uint8 views plus the augmentation factors to apply.

    Returns {"image": [3, S, S] uint8, ["image_tok": [3, T, T] uint8], "flip": bool [], "jitter": [3]}.
    """

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        if self.backend == "torch":
            views, flip, jitter = self._sample_tensors(img)
            out = {key: view.contiguous() for (key, _, _), view in zip(self.views, views)}
        else:
            views, flip, jitter = self._sample(img)
            out = {key: pil_to_uint8(view) for (key, _, _), view in zip(self.views, views)}
        out["flip"] = torch.tensor(flip)
        out["jitter"] = torch.tensor(jitter, dtype=torch.float32)
        return out


class DeviceTransform(nn.Module):
    """Device mode, device half: uint8 views + factors -> float normalised views, batched.

    `batch` is the stream's dict; "image" / "image_tok" are replaced, "flip" and "jitter" consumed,
    every other entry passes through. Deterministic: all randomness was drawn in the worker, so a
    resumed run augments exactly as the original did. Move it with `.to(device)`.
    """

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, tok_mean=DALLE_MEAN, tok_std=DALLE_STD,
                 color_jitter: float = 0.4, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)
        self.register_buffer("tok_mean", torch.tensor(tok_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("tok_std", torch.tensor(tok_std, dtype=torch.float32), persistent=False)
        self.color_jitter = color_jitter
        self.dtype = dtype

    @torch.no_grad()
    def forward(self, batch: dict) -> dict:
        out = {k: v for k, v in batch.items() if k not in ("flip", "jitter")}
        if "flip" not in batch:  # worker-mode batch: nothing to do
            return out
        flip = batch["flip"].to(self.mean.device).view(-1, 1, 1, 1)
        for key, mean, std in (("image", self.mean, self.std), ("image_tok", self.tok_mean, self.tok_std)):
            if key not in batch:
                continue
            x = batch[key].to(self.mean.device, non_blocking=True).float().div_(255)
            x = torch.where(flip, x.flip(-1), x)
            if self.color_jitter > 0:
                x = apply_jitter(x, batch["jitter"].to(x.device))
            out[key] = normalise(x, mean, std).to(self.dtype)
        return out


class HeaderOnlyTransform(DecodeOnlyTransform):
    """Decode-on-device mode, worker half: a whole RGB or grey JPEG is not decoded here; its header gives the
    size, the crop box, flip and jitter are drawn as in the other modes, and its bytes go to the device.

    Per sample: {"jpeg": encoded bytes (1-D uint8), "box": [4] long (left, top, right, bottom), "decoded":
    1-D uint8 (empty), "flip", "jitter"}. Anything else (PNG, WebP, CMYK JPEG, a JPEG without its end marker:
    truncated, or with bytes after the image) is the fallback: decoded here as `DecodeOnlyTransform` does,
    its uint8 views flattened into "decoded" (image, then image_tok), "jpeg" empty, so the stream's skip
    counting sees a truncated JPEG fail here as in the other modes. No draft(): the device decodes at full
    size, and the fallback crops the full image too. The stream concatenates the `RAGGED_KEYS`.
    """

    needs_bytes = True  # the stream calls it with the opened image and the encoded bytes

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.use_draft = False

    def __call__(self, img: Image.Image, data: bytes) -> dict[str, torch.Tensor]:
        if not device_decodable(img, data):
            sample = super().__call__(img)
            decoded = torch.cat([sample.pop(key).reshape(-1) for key, _, _ in self.views])
            return {"jpeg": torch.empty(0, dtype=torch.uint8), "box": torch.zeros(4, dtype=torch.long),
                    "decoded": decoded, **sample}
        box, flip, jitter = self._draw(img)
        return {"jpeg": torch.frombuffer(bytearray(data), dtype=torch.uint8),
                "box": torch.tensor(box, dtype=torch.long), "decoded": torch.empty(0, dtype=torch.uint8),
                "flip": torch.tensor(flip), "jitter": torch.tensor(jitter, dtype=torch.float32)}


# Per-sample 1-D tensors of varying length: the stream concatenates them into batch[KEY] and puts each
# sample's length in batch[KEY + "_sizes"].
RAGGED_KEYS = ("jpeg", "decoded")


def device_decodable(img: Image.Image, data: bytes) -> bool:
    """A JPEG the device decoder takes as the worker would: baseline / progressive RGB or grey, whole (ends
    with the EOI marker; a truncated file then fails in the worker and is counted as in the other modes)."""
    return img.format == "JPEG" and img.mode in ("RGB", "L") and data.endswith(b"\xff\xd9")


def resize_uint8_on_device(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """`resize_uint8` on any device: GPUs have no uint8 antialiased kernels, so there it resizes in float
    and rounds back to uint8 (within 1 / 255 of the CPU's uint8 kernel)."""
    if x.device.type == "cpu":  # the fast uint8 kernel needs channels-last contiguous memory (a box is a
        # strided view of the decoded image: 10x slower without this 0.2 ms copy at ImageNet size)
        return resize_uint8(x.unsqueeze(0).contiguous(memory_format=torch.channels_last)[0], size, mode)
    return resize_through_float(x, size, mode)


def resize_through_float(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    if x.shape[1] == size and x.shape[2] == size:
        return x
    y = nnf.interpolate(x.unsqueeze(0).float(), size=(size, size), mode=mode, antialias=True)[0]
    return y.round_().clamp_(0, 255).to(torch.uint8)


class DeviceDecodeTransform(DeviceTransform):
    """Decode-on-device mode, device half: encoded JPEGs + crop boxes + factors -> the batch `DeviceTransform`
    returns in device mode (same keys, shapes, dtype).

    One batched `torchvision.io.decode_jpeg(..., device=...)` (nvJPEG on a GPU; libjpeg-turbo on the CPU,
    as the tests run it), then per image: cut the box, resize it to `image_size` (uint8, antialiased, torch's
    kernels as device mode's torch backend) and the tokenizer view from the image view (`tok_from_image`,
    torch's antialiased bicubic as `tok_approx`) or from the box; the worker's fallback views are put back
    at their places; flip, jitter and normalisation are `DeviceTransform`'s. A JPEG the device decoder
    rejects although its header and end marker were whole (a corrupt body) becomes a mid-grey image, with
    a warning: the batch keeps its size, and the rejection is counted as an "undecodable image" skip in the
    batch's "skipped" / "skipped_by" (read them after this call) and through `on_reject` (the stream's totals).
    """

    def __init__(self, image_size: int = 224, tok_size: int | None = None, interpolation: str = "bicubic",
                 tok_interpolation: str = "lanczos", tok_from_image: bool = True, **kw):
        super().__init__(**kw)
        if interpolation not in TORCH_MODES:
            raise ValueError(f"decode on device resizes with {sorted(TORCH_MODES)}, got '{interpolation}'")
        self.image_size, self.tok_size, self.mode = image_size, tok_size, interpolation
        self.tok_mode = TORCH_MODES.get(tok_interpolation, "bicubic")
        self.tok_from_image = tok_from_image and bool(tok_size) and tok_size <= image_size
        self.rejected = 0
        self.on_reject: Callable[[], None] | None = None  # set by the stream: its skip totals count them too

    @torch.no_grad()
    def forward(self, batch: dict) -> dict:
        if "jpeg" not in batch:  # a batch of another mode
            return super().forward(batch)
        rejected_before = self.rejected
        views = self.views(batch)
        if self.rejected > rejected_before and "skipped_by" in batch:
            batch = count_undecodable(batch, self.rejected - rejected_before)
        consumed = ("box", *RAGGED_KEYS, *(key + "_sizes" for key in RAGGED_KEYS))
        rest = {k: v for k, v in batch.items() if k not in consumed}
        return super().forward({**views, **rest})  # the keys in device mode's order

    def views(self, batch: dict) -> dict[str, torch.Tensor]:
        """uint8 [B, 3, S, S] "image" (and [B, 3, T, T] "image_tok") on the device, in batch order."""
        device = self.mean.device
        jpeg_sizes, decoded_sizes = batch["jpeg_sizes"].tolist(), batch["decoded_sizes"].tolist()
        on_device = [i for i, n in enumerate(jpeg_sizes) if n > 0]
        encoded = batch["jpeg"].cpu().split(jpeg_sizes)  # the decoder reads host memory
        images = self.decode([encoded[i] for i in on_device], device)
        shapes = [("image", self.image_size)] + ([("image_tok", self.tok_size)] if self.tok_size else [])
        out: dict[str, list] = {key: [None] * len(jpeg_sizes) for key, _ in shapes}
        boxes = batch["box"].tolist()
        for i, image in zip(on_device, images):
            if image is None:  # rejected by the decoder: a mid-grey stand-in
                crop = torch.full((3, self.image_size, self.image_size), 128, dtype=torch.uint8, device=device)
            else:
                left, top, right, bottom = boxes[i]
                crop = image[:, top:bottom, left:right]
            out["image"][i] = resize_uint8_on_device(crop, self.image_size, self.mode)
            if self.tok_size:
                source = out["image"][i] if self.tok_from_image else crop
                out["image_tok"][i] = resize_uint8_on_device(source, self.tok_size, self.tok_mode)
        flat = batch["decoded"].to(device, non_blocking=True).split(decoded_sizes)
        for i, n in enumerate(decoded_sizes):
            if n > 0:  # decoded in the worker: image, then image_tok, each [3, S, S] flattened
                parts = flat[i].split([3 * size * size for _, size in shapes])
                for (key, size), part in zip(shapes, parts):
                    out[key][i] = part.view(3, size, size)
        return {key: torch.stack(views) for key, views in out.items()}

    def decode(self, encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
        """RGB uint8 [3, H, W] per JPEG, in one batched call; None for one the decoder rejects."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if not encoded:
            return []
        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad image fails the whole call: decode one by one to find it
            out: list[torch.Tensor | None] = []
            for data in encoded:
                try:
                    out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                except RuntimeError as err:
                    self.rejected += 1
                    if self.on_reject is not None:
                        self.on_reject()
                    log.warning("the device decoder rejected a JPEG (%s); a grey image stands in for it "
                                "[rejected so far: %d]", err, self.rejected)
                    out.append(None)
            return out


def count_undecodable(batch: dict, count: int) -> dict:
    """`batch` with `count` more "undecodable image" skips in "skipped" and "skipped_by"."""
    from mimkit.data.sources import SKIP_REASONS  # here: sources imports this module

    by = batch["skipped_by"].clone()
    by[SKIP_REASONS.index("undecodable image")] += count
    return {**batch, "skipped": batch["skipped"] + count, "skipped_by": by}


DATA_MODES = ("worker", "device", "decode_on_device")


def build_transform(mode: str = "worker", **options) -> Callable[[Image.Image], dict[str, torch.Tensor]]:
    """The worker half of `mode` (`DATA_MODES`): `ViewTransform` for "worker", `DecodeOnlyTransform` for
    "device", `HeaderOnlyTransform` for "decode_on_device" (mean/std options dropped: they belong to the
    device half, `build_device_transform`)."""
    if mode == "worker":
        return ViewTransform(**options)
    if mode in ("device", "decode_on_device"):
        for key in ("mean", "std", "tok_mean", "tok_std"):
            options.pop(key, None)
        return DecodeOnlyTransform(**options) if mode == "device" else HeaderOnlyTransform(**options)
    raise ValueError(f"unknown data mode '{mode}' (expected one of {DATA_MODES})")


def build_device_transform(mode: str = "worker", dtype: torch.dtype = torch.float32, **options) -> DeviceTransform:
    """The device half of `mode`, from `build_transform`'s options (those it does not use are ignored):
    `DeviceTransform` (passes worker-mode batches through), or `DeviceDecodeTransform` for "decode_on_device"."""
    norm = {key: options[key] for key in ("mean", "std", "tok_mean", "tok_std", "color_jitter") if key in options}
    if mode != "decode_on_device":
        return DeviceTransform(**norm, dtype=dtype)
    views = {key: options[key] for key in ("image_size", "tok_size", "interpolation", "tok_interpolation",
                                           "tok_from_image") if key in options}
    return DeviceDecodeTransform(**views, **norm, dtype=dtype)
