"""Data loading throughput, images per second on one core; prints JSON.

    python bench/data.py [--images 300] [--batch 32] [--repeats 3] [--image-size 224] [--tok-size 112]
    python bench/data.py --paths DEVICE [--images 256] [--batch 64] [--workers N]

Side by side on the same ImageNet-size JPEGs (about 500 x 375, cut from scikit-image's sample photos):

* mimkit worker mode: tar shards -> `ViewTransform` (draft() decode, one crop box, torch uint8 antialiased
  224 bicubic view, 112 tokenizer view from it, flip, fused float jitter + normalise) + block mask, through
  `build_stream`;
* the same with `tok_approx=False` (tokenizer view by PIL's lanczos from the 224 view instead of torch's
  antialiased bicubic) and with `backend="pil"` (the previous, all-PIL path: PIL resize, uint8 LUT jitter);
* torchvision worker mode, stock: `ImageFolder` + `DataLoader` with BEiT's reference composition of
  stock ops (ColorJitter on the full image, flip, crop -> 224 bicubic + 112 lanczos, ToTensor, Normalize);
* torchvision worker mode, matched: the same order of work as mimkit (jitter on the views, as tensors),
  with torchvision ops on a full decode: what the decode / resize path alone saves;
* device mode for both: the workers stop at uint8 views (mimkit: `DecodeOnlyTransform`; torchvision:
  full decode + `resized_crop` + `pil_to_tensor`), then one batched `DeviceTransform` on the CPU.

Everything runs in the main process (num_workers=0, one torch thread), so the rate is per core; the
headline rate divides by this process's CPU time, which other load on a shared machine barely changes
(wall-clock rates are reported too). Each measurement is the best of `--repeats` passes.

`--paths DEVICE` (`data_path_rates`) measures whole-machine wall-clock rates instead: worker mode through
`build_stream`'s DataLoader on all cores vs `data.mode=decode_on_device` (workers parse JPEG headers, the
main process decodes each batch on DEVICE), on the same JPEGs.
"""

from __future__ import annotations

import argparse
import os
import sys
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mimkit.data.shards import write_shards
from mimkit.data.sources import read_shard
from mimkit.data.stream import DataConfig, build_stream
from mimkit.data.transforms import (
    DALLE_MEAN, DALLE_STD, IMAGENET_MEAN, IMAGENET_STD, DeviceTransform, SecondView, ViewTransform, apply_jitter,
    normalise,
    sample_jitter,
)

SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                 "retina", "skin", "motorcycle_left", "lily", "cat", "colorwheel")


def mask_generator():
    """BEiT block masking (75 of 14 x 14): mimkit's mask source, and the same sampler per sample for the
    torchvision loaders (each of their workers draws from its own NumPy state)."""
    from mimkit.data.masking import BlockMasks, sample_block_mask

    def per_sample() -> np.ndarray:
        return sample_block_mask((14, 14), 75, rng=np.random.default_rng(np.random.randint(2**31)))

    return BlockMasks((14, 14), 75), per_sample, "mimkit.data.masking.BlockMasks"


def load_photos() -> list[np.ndarray]:
    import skimage.data

    photos = []
    for name in SAMPLE_PHOTOS:
        try:
            img = getattr(skimage.data, name)()
        except Exception:  # some need a download; skip them
            continue
        if isinstance(img, tuple):
            img = img[0]
        if img.ndim == 3 and img.shape[2] >= 3 and min(img.shape[:2]) >= 256:
            photos.append(np.ascontiguousarray(img[..., :3]).astype(np.uint8))
    if not photos:
        raise RuntimeError("no scikit-image sample photos available")
    return photos


def make_dataset(root: Path, count: int, seed: int = 0, scale: float = 1.0) -> tuple[Path, Path]:
    """ImageFolder (2 classes) and shards of the same `count` JPEGs of ImageNet-like size (x `scale`)."""
    rng = random.Random(seed)
    photos = load_photos()
    folder = root / "imagefolder"
    items = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
        top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
        size = rng.choice([(500, 375), (500, 333), (375, 500), (500, 400), (450, 350)])
        size = (int(size[0] * scale), int(size[1] * scale))
        img = Image.fromarray(photo[top:top + ch, left:left + cw]).resize(size, Image.Resampling.BILINEAR)
        path = folder / f"c{i % 2}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="JPEG", quality=rng.randint(85, 95))
        items.append((str(path), i % 2))
    shards = root / "shards"
    write_shards(items, shards, maxcount=100, progress=False)
    return folder, shards


class StockBEiTViews:
    """BEiT's reference composition with stock torchvision ops: ColorJitter on the full PIL image, flip,
    one crop box -> 224 bicubic + 112 lanczos, ToTensor, Normalize (ImageNet / DALL-E map)."""

    def __init__(self, image_size: int, tok_size: int, mask_fn):
        from torchvision import transforms as T

        self.T, self.mask_fn = T, mask_fn
        self.pre = T.Compose([T.ColorJitter(0.4, 0.4, 0.4), T.RandomHorizontalFlip()])
        self.crop = T.RandomResizedCrop(image_size)
        self.sizes = (image_size, tok_size)
        self.post = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.post_tok = T.Compose([T.ToTensor(), T.Normalize(DALLE_MEAN, DALLE_STD)])

    def __call__(self, img: Image.Image) -> dict:
        F, IM = self.T.functional, self.T.InterpolationMode
        img = self.pre(img.convert("RGB"))
        top, left, h, w = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        return {"image": self.post(F.resized_crop(img, top, left, h, w, [self.sizes[0]] * 2, IM.BICUBIC)),
                "image_tok": self.post_tok(F.resized_crop(img, top, left, h, w, [self.sizes[1]] * 2, IM.LANCZOS)),
                "mask": torch.from_numpy(self.mask_fn().reshape(-1))}


class MatchedViews:
    """mimkit's augmentation order (jitter on the views, as float tensors) with torchvision ops on a full
    decode, both views resized from the box: isolates what the decode / resize path saves."""

    def __init__(self, image_size: int, tok_size: int, device_mode: bool, mask_fn):
        from torchvision import transforms as T

        self.T = T
        self.crop = T.RandomResizedCrop(image_size)
        self.image_size, self.tok_size, self.device_mode, self.mask_fn = image_size, tok_size, device_mode, mask_fn
        self.stats = [(torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)),
                      (torch.tensor(DALLE_MEAN), torch.tensor(DALLE_STD))]

    def __call__(self, img: Image.Image) -> dict:
        F, IM = self.T.functional, self.T.InterpolationMode
        img = img.convert("RGB")
        top, left, h, w = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        views = [F.pil_to_tensor(F.resized_crop(img, top, left, h, w, [self.image_size] * 2, IM.BICUBIC)),
                 F.pil_to_tensor(F.resized_crop(img, top, left, h, w, [self.tok_size] * 2, IM.LANCZOS))]
        flip, jitter = random.random() < 0.5, sample_jitter(0.4)
        out = {"mask": torch.from_numpy(self.mask_fn().reshape(-1))}
        if self.device_mode:
            out.update(image=views[0], image_tok=views[1], flip=torch.tensor(flip), jitter=torch.tensor(jitter))
            return out
        for key, view, (mean, std) in zip(("image", "image_tok"), views, self.stats):
            x = F.convert_image_dtype(view, torch.float32).unsqueeze(0)
            x = x.flip(-1) if flip else x
            out[key] = normalise(apply_jitter(x, torch.tensor([jitter])), mean, std)[0]
        return out


def rate(run, images: int, repeats: int) -> dict:
    """Images per second of `run()` (which processes `images` images): per CPU second of this process
    (robust to other load on the machine) and per wall second; best of `repeats` passes each."""
    cpu = wall = float("inf")
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        run()
        cpu, wall = min(cpu, time.process_time() - c0), min(wall, time.perf_counter() - w0)
    return {"cpu": round(images / cpu, 1), "wall": round(images / wall, 1)}


def bench(args) -> dict:
    from torchvision.datasets import ImageFolder

    torch.set_num_threads(1)
    masks, mask_fn, mask_name = mask_generator()
    device_transform = DeviceTransform(color_jitter=0.4)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = make_dataset(Path(tmp), args.images, scale=args.photo_scale)
        batches = args.images // args.batch
        images = batches * args.batch
        tar_files = sorted(str(p) for p in shards.glob("*.tar"))
        results: dict = {"tar_read_only": rate(
            lambda: [s for p in tar_files for s in read_shard(p, lambda: True, lambda *a: None)],
            args.images, args.repeats)}

        def mimkit_run(mode: str, **transform_kw):
            cfg = DataConfig(shards=str(shards), batch_size=args.batch, num_workers=0, batches_per_epoch=batches,
                             shuffle_buffer=100, mode=mode, image_size=args.image_size)
            transform = ViewTransform(image_size=args.image_size, tok_size=args.tok_size, **transform_kw) \
                if transform_kw else None
            loader = build_stream(cfg, transform=transform, masks=masks, second_view=SecondView(args.tok_size))

            def run():
                for batch in loader:
                    if mode == "device":
                        device_transform(batch)
            return run

        def torchvision_run(transform, device: bool):
            loader = torch.utils.data.DataLoader(ImageFolder(str(folder), transform=transform),
                                                 batch_size=args.batch, shuffle=True, num_workers=0, drop_last=True)

            def run():
                for i, (batch, _) in enumerate(loader):
                    if device:
                        device_transform(batch)
                    if i + 1 == batches:
                        break
            return run

        runs = {
            "worker/mimkit": mimkit_run("worker"),
            "worker/mimkit_tok_lanczos": mimkit_run("worker", tok_approx=False),
            "worker/mimkit_pil_backend": mimkit_run("worker", backend="pil"),
            "worker/torchvision_stock_beit": torchvision_run(StockBEiTViews(args.image_size, args.tok_size, mask_fn), False),
            "worker/torchvision_matched": torchvision_run(
                MatchedViews(args.image_size, args.tok_size, False, mask_fn), False),
            "device/mimkit": mimkit_run("device"),
            "device/torchvision_matched": torchvision_run(
                MatchedViews(args.image_size, args.tok_size, True, mask_fn), True),
        }
        for name, run in runs.items():
            results[name] = rate(run, images, args.repeats)
    speedup = {
        "worker_vs_stock": round(results["worker/mimkit"]["cpu"] / results["worker/torchvision_stock_beit"]["cpu"], 2),
        "worker_tok_lanczos_vs_stock": round(
            results["worker/mimkit_tok_lanczos"]["cpu"] / results["worker/torchvision_stock_beit"]["cpu"], 2),
        "worker_pil_backend_vs_stock": round(
            results["worker/mimkit_pil_backend"]["cpu"] / results["worker/torchvision_stock_beit"]["cpu"], 2),
        "worker_vs_matched": round(results["worker/mimkit"]["cpu"] / results["worker/torchvision_matched"]["cpu"], 2),
        "device_vs_matched": round(results["device/mimkit"]["cpu"] / results["device/torchvision_matched"]["cpu"], 2),
    }
    return {
        "bench": "data",
        "images": images,
        "batch": args.batch,
        "views": [args.image_size, args.tok_size],
        "photo_scale": args.photo_scale,
        "mask": mask_name,
        "method": f"num_workers=0, torch threads=1, best of {args.repeats} passes; 'cpu' = images per CPU second",
        "img_per_s_per_core": results,
        "speedup_cpu": speedup,
        "machine": {
            "cpu": _cpu_name(), "cores": os.cpu_count(), "avx512": _has_flag("avx512f"),
            "loadavg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)], "python": platform.python_version(),
            "torch": torch.__version__, "pillow": Image.__version__,
        },
    }


def data_path_rates(device: str, images: int = 256, batch: int = 64, workers: int | None = None) -> dict:
    """Images per second (wall clock, best of 2 passes) of two whole data paths on this machine, on the same
    ImageNet-size JPEGs, BEiT's views (224 bicubic + 112), colour jitter 0.4, no masks: worker mode through
    `build_stream`'s DataLoader with `workers` processes (default: all cores), each batch's views then moved to
    `device`; and decode_on_device mode (the workers parse headers, `loader.device_transform` decodes each
    batch on `device` in the main process, with one torch thread on a CPU). `image_px` is the mean photo size."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    batches = max(1, images // batch)
    on_gpu = torch.device(device).type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = make_dataset(Path(tmp), images)
        sizes = np.array([Image.open(p).size for p in folder.rglob("*.jpg")])

        def path(mode: str):
            cfg = DataConfig(shards=str(shards), batch_size=batch, num_workers=workers, batches_per_epoch=batches,
                             shuffle_buffer=100, mode=mode)
            loader = build_stream(cfg, second_view=SecondView(112), device=device)

            def run():
                for raw in loader:
                    out = loader.device_transform(raw)
                    for key in ("image", "image_tok"):  # where the model is (decode_on_device: there already)
                        out[key].to(device, non_blocking=True)
                if on_gpu:
                    torch.cuda.synchronize()
            return run

        threads = torch.get_num_threads()
        if not on_gpu:  # the main process decodes beside the workers: one thread, not an oversubscribed pool
            torch.set_num_threads(1)
        try:
            rates = {mode: rate(path(mode), batches * batch, repeats=2)["wall"] for mode in ("worker", "decode_on_device")}
        finally:
            torch.set_num_threads(threads)
    return {"device": torch.cuda.get_device_name(device) if on_gpu else f"cpu ({_cpu_name()})",
            "worker_mode_all_cores_img_s": rates["worker"], "decode_on_device_img_s": rates["decode_on_device"],
            "workers": workers, "cores": os.cpu_count(), "images": batches * batch, "batch": batch,
            "image_px": [int(v) for v in sizes.mean(0).round()]}


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _has_flag(flag: str) -> bool:
    try:
        return any(line.startswith("flags") and f" {flag}" in line for line in open("/proc/cpuinfo"))
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=None, help="default 320; 256 with --paths")
    parser.add_argument("--batch", type=int, default=None, help="default 32; 64 with --paths")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--tok-size", type=int, default=112)
    parser.add_argument("--photo-scale", type=float, default=1.0,
                        help="photo size relative to ImageNet's ~500 x 375 (2.0: 1000 x 750, where draft() helps)")
    parser.add_argument("--paths", metavar="DEVICE", default=None,
                        help="only worker mode on all cores vs decode_on_device on DEVICE (cpu, cuda): `data_path_rates`")
    parser.add_argument("--workers", type=int, default=None, help="with --paths: DataLoader workers (default: all cores)")
    args = parser.parse_args(argv)
    if args.paths:
        print(json.dumps(data_path_rates(args.paths, args.images or 256, args.batch or 64, args.workers)))
        return 0
    args.images, args.batch = args.images or 320, args.batch or 32
    print(json.dumps(bench(args), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
