"""Embedded demo data: a small labelled dataset built offline from images shipped inside installed packages.

Backgrounds are random crops of real photographs and textures from scikit-image (`skimage.data`, only
the images bundled in the wheel) and scikit-learn (`load_sample_images`). On each background we paste
1-3 non-overlapping filled shapes of K classes (circle, square, triangle, star, cross) with random colour,
size, rotation and position. The image-level class is the class of the largest object; the generator
draws that object first, so classes are balanced by construction.

One set of generated images is written in the real on-disk formats the stages read:

    ROOT/imagefolder/{train,val}/<class>/*.jpg            torchvision ImageFolder
    ROOT/shards/train-000000.tar ... + sizes.json          WebDataset tar: .jpg, .cls, .json (mimkit.data.shards)
    ROOT/shards/val/val-000000.tar ... + sizes.json
    ROOT/ADEChallengeData2016/images/{training,validation}/*.jpg
    ROOT/ADEChallengeData2016/annotations/{training,validation}/*.png   0 = other (ignored), k = class k
    ROOT/coco/images/{train,val}/*.jpg
    ROOT/coco/annotations/instances_{train,val}.json       polygons for some objects, RLE for others

Objects never overlap, and every object's pixels are rasterised by pycocotools from its polygon, so the
segmentation PNG, the COCO polygon and the COCO RLE describe exactly the same pixels.

Deterministic from the seed; a stamp file (`demo.json`) makes a second call with the same parameters a no-op.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from mimkit.data.shards import write_shards

# Bump when the output of the generator changes, so stale caches are rebuilt.
GENERATOR_VERSION = 2
STAMP_NAME = "demo.json"

SHAPES = ("circle", "square", "triangle", "star", "cross")
# Original-looking COCO category ids: start at 1, with gaps, so loaders must map ids to contiguous labels.
COCO_CATEGORY_IDS = (1, 2, 4, 7, 9)

# Images bundled in the scikit-image wheel (no pooch download) and scikit-learn's two sample photos.
SKIMAGE_BACKGROUNDS = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "brick", "grass", "gravel",
    "moon", "coins", "immunohistochemistry", "hubble_deep_field", "retina", "clock", "cell",
)  # fmt: skip
SKLEARN_BACKGROUNDS = ("china.jpg", "flower.jpg")

JPEG_QUALITY = 90


@dataclass
class DemoPaths:
    root: Path
    class_names: list[str]
    coco_category_ids: list[int]
    image_size: int
    num_train: int
    num_val: int
    imagefolder_train: Path
    imagefolder_val: Path
    shards_dir: Path
    train_shards: list[Path]
    train_shard_pattern: str  # brace pattern, e.g. ".../train-{000000..000003}.tar"
    train_sizes: Path
    val_shards_dir: Path
    val_shards: list[Path]
    val_shard_pattern: str
    val_sizes: Path
    ade_root: Path
    coco_root: Path
    coco_train_images: Path
    coco_val_images: Path
    coco_train_json: Path
    coco_val_json: Path
    params: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _shard_names(prefix: str, count: int, per_shard: int) -> list[str]:
    return [f"{prefix}-{i:06d}.tar" for i in range(math.ceil(count / per_shard))]


def _brace(directory: Path, prefix: str, names: list[str]) -> str:
    return str(directory / f"{prefix}-{{000000..{len(names) - 1:06d}}}.tar")


def demo_paths(root: str | os.PathLike, params: dict) -> DemoPaths:
    """Where `make_demo_data(root, **params)` puts everything."""
    root = Path(root)
    k = params["num_classes"]
    num_train, num_val = k * params["images_per_class"], k * params["val_per_class"]
    shards, val_shards = root / "shards", root / "shards" / "val"
    train_names = _shard_names("train", num_train, params["images_per_shard"])
    val_names = _shard_names("val", num_val, params["images_per_shard"])
    coco = root / "coco"
    return DemoPaths(
        root=root,
        class_names=list(SHAPES[:k]),
        coco_category_ids=list(COCO_CATEGORY_IDS[:k]),
        image_size=params["image_size"],
        num_train=num_train,
        num_val=num_val,
        imagefolder_train=root / "imagefolder" / "train",
        imagefolder_val=root / "imagefolder" / "val",
        shards_dir=shards,
        train_shards=[shards / n for n in train_names],
        train_shard_pattern=_brace(shards, "train", train_names),
        train_sizes=shards / "sizes.json",
        val_shards_dir=val_shards,
        val_shards=[val_shards / n for n in val_names],
        val_shard_pattern=_brace(val_shards, "val", val_names),
        val_sizes=val_shards / "sizes.json",
        ade_root=root / "ADEChallengeData2016",
        coco_root=coco,
        coco_train_images=coco / "images" / "train",
        coco_val_images=coco / "images" / "val",
        coco_train_json=coco / "annotations" / "instances_train.json",
        coco_val_json=coco / "annotations" / "instances_val.json",
        params=dict(params),
    )


# ---------------------------------------------------------------- backgrounds


@lru_cache(maxsize=4)
def _load_backgrounds(max_side: int) -> tuple[tuple[str, np.ndarray], ...]:
    """Every bundled source image as RGB uint8, downscaled so its short side is at most `max_side`."""
    import skimage.data
    from sklearn.datasets import load_sample_image

    sources = [(name, getattr(skimage.data, name)()) for name in SKIMAGE_BACKGROUNDS]
    sources += [(name.removesuffix(".jpg"), load_sample_image(name)) for name in SKLEARN_BACKGROUNDS]
    out = []
    for name, array in sources:
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        image = Image.fromarray(np.ascontiguousarray(array[..., :3]).astype(np.uint8))
        scale = max_side / min(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        out.append((name, np.asarray(image)))
    return tuple(out)


def _random_background(rng: np.random.Generator, size: int) -> tuple[str, np.ndarray]:
    """A random square crop (random scale and position, maybe flipped) of a random source, resized to `size`."""
    sources = _load_backgrounds(4 * size)
    name, array = sources[int(rng.integers(len(sources)))]
    h, w = array.shape[:2]
    side = int(min(h, w) * rng.uniform(0.25, 1.0))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(array[top : top + side, left : left + side]).resize((size, size), Image.BILINEAR)
    out = np.asarray(crop)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return name, np.ascontiguousarray(out)


# ---------------------------------------------------------------- shapes


def shape_polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[float]:
    """Flat [x0, y0, x1, y1, ...] outline of a shape whose vertices lie within `radius` of (cx, cy)."""
    if shape == "circle":
        n, radii = 32, [1.0]
    elif shape == "square":
        n, radii = 4, [1.0]
    elif shape == "triangle":
        n, radii = 3, [1.0]
    elif shape == "star":
        n, radii = 10, [1.0, 0.45]  # alternate outer and inner vertices
    elif shape == "cross":
        # a plus sign: 12 vertices, arms of half-width 0.3 (in units of the radius)
        a, b = 0.3, 1.0
        pts = [(a, b), (a, a), (b, a), (b, -a), (a, -a), (a, -b), (-a, -b), (-a, -a), (-b, -a), (-b, a), (-a, a), (-a, b)]
        scale = radius / math.hypot(a, b)
        c, s = math.cos(angle), math.sin(angle)
        return [v for x, y in pts for v in (cx + scale * (c * x - s * y), cy + scale * (s * x + c * y))]
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    out = []
    for i in range(n):
        theta = angle + 2 * math.pi * i / n
        r = radius * radii[i % len(radii)]
        out += [cx + r * math.cos(theta), cy + r * math.sin(theta)]
    return out


def rasterize_polygon(polygon: list[float], size: int) -> np.ndarray:
    """[size, size] bool, rasterised by pycocotools so it equals COCO's `annToMask` of the polygon."""
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], size, size))
    return mask_utils.decode(rle).astype(bool)


def _dilate(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1)
    return mask | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]


def _place_object(rng, shape, size, radius_range, occupied, max_area=None, tries=20):
    """A non-overlapping (1 px gap) object, or None. Returns (polygon, mask)."""
    for _ in range(tries):
        radius = rng.uniform(*radius_range) * size
        margin = radius + 1
        if 2 * margin >= size:
            continue
        cx, cy = rng.uniform(margin, size - margin, size=2)
        polygon = shape_polygon(shape, float(cx), float(cy), float(radius), float(rng.uniform(0, 2 * math.pi)))
        # Rounded before rasterising, so the JSON polygon rasterises to exactly these pixels.
        polygon = [round(v, 2) for v in polygon]
        mask = rasterize_polygon(polygon, size)
        if not mask.any() or (_dilate(mask) & occupied).any():
            continue
        if max_area is not None and mask.sum() >= max_area:
            continue
        return polygon, mask
    return None


def _object_colour(rng, background: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A colour far from the background under the object, so the shape stays visible."""
    under = background[mask].mean(axis=0)
    best, best_dist = None, -1.0
    for _ in range(8):
        colour = rng.integers(0, 256, size=3)
        dist = float(np.abs(colour - under).sum())
        if dist > best_dist:
            best, best_dist = colour, dist
        if dist > 200:
            break
    return best.astype(np.uint8)


def make_sample(rng: np.random.Generator, label: int, num_classes: int, size: int) -> dict:
    """One image whose largest object has class `label`, plus 0-2 smaller distractors of any class.

    Returns image [size, size, 3] uint8, seg [size, size] uint8 (0 = other, k + 1 = class k),
    objects (list of dicts: class, polygon, mask) and the background's name.
    """
    source, image = _random_background(rng, size)
    image = image.copy()
    seg = np.zeros((size, size), dtype=np.uint8)
    occupied = np.zeros((size, size), dtype=bool)
    objects = []
    main = _place_object(rng, SHAPES[label], size, (0.22, 0.34), occupied, tries=100)
    if main is None:  # cannot happen for these radii, but never return an unlabelled image
        raise RuntimeError("could not place the main object")
    specs = [(label, main)]
    occupied |= main[1]
    for _ in range(int(rng.integers(0, 3))):
        cls = int(rng.integers(num_classes))
        # strictly smaller than the main object (with a margin), so the image label is unambiguous
        placed = _place_object(rng, SHAPES[cls], size, (0.1, 0.18), occupied, max_area=0.7 * main[1].sum())
        if placed is not None:
            specs.append((cls, placed))
            occupied |= placed[1]
    for cls, (polygon, mask) in specs:
        image[mask] = _object_colour(rng, image, mask)
        seg[mask] = cls + 1
        objects.append({"class": cls, "polygon": polygon, "mask": mask})
    return {"image": image, "seg": seg, "objects": objects, "label": label, "source": source}


# ---------------------------------------------------------------- writers


def _jpeg_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _png_bytes(label: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(label, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _write_shards(directory: Path, prefix: str, samples: list[dict], paths: DemoPaths) -> None:
    """WebDataset tar shards through the project's shard writer: `.jpg` (our bytes, passed through),
    `.cls`, `.json` ({"path": sample key, "class": name}), plus `sizes.json` and `classes.json`."""
    items = [(s["jpeg"], s["label"], s["key"]) for s in samples]
    result = write_shards(
        items, directory, maxcount=paths.params["images_per_shard"], prefix=prefix,
        classes=paths.class_names, progress=False,
    )  # fmt: skip
    if result["skipped"] or result["written"] != len(samples):
        raise RuntimeError(f"shard writer skipped demo samples: {result['skipped'][:3]}")


def _coco_annotations(samples: list[dict], paths: DemoPaths, first_ann_id: int) -> dict:
    """COCO instances json. Every other object is stored as compressed RLE, the rest as polygons."""
    images, annotations = [], []
    ann_id = first_ann_id
    for s in samples:
        images.append({"id": s["image_id"], "file_name": s["coco_name"], "height": s["size"], "width": s["size"]})
        for obj in s["objects"]:
            rle = mask_utils.encode(np.asfortranarray(obj["mask"].astype(np.uint8)))
            if ann_id % 2:
                segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            else:
                segmentation = [list(obj["polygon"])]
            annotations.append({
                "id": ann_id,
                "image_id": s["image_id"],
                "category_id": paths.coco_category_ids[obj["class"]],
                "segmentation": segmentation,
                "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            })  # fmt: skip
            ann_id += 1
    categories = [
        {"id": cid, "name": name, "supercategory": "shape"}
        for cid, name in zip(paths.coco_category_ids, paths.class_names)
    ]
    return {
        "info": {"description": "mimkit embedded demo data", "version": str(GENERATOR_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def _generate_split(rng, split: str, per_class: int, paths: DemoPaths, first_image_id: int) -> list[dict]:
    k, size = paths.num_classes, paths.image_size
    labels = rng.permutation(np.repeat(np.arange(k), per_class))  # balanced, shuffled order for the shards
    samples = []
    for i, label in enumerate(labels):
        s = make_sample(rng, int(label), k, size)
        s["index"], s["image_id"], s["size"] = i, first_image_id + i, size
        s["key"] = f"{split}{i:06d}"
        s["coco_name"] = f"{s['image_id']:012d}.jpg"
        s["jpeg"] = _jpeg_bytes(s["image"])
        samples.append(s)
    return samples


def _write_split(samples: list[dict], split: str, paths: DemoPaths, root: Path) -> None:
    """All formats for one split, under `root` (the build directory, renamed to paths.root at the end)."""
    rel = lambda p: root / Path(p).relative_to(paths.root)  # noqa: E731
    ade_split = {"train": "training", "val": "validation"}[split]
    ade_prefix = {"train": "ADE_train", "val": "ADE_val"}[split]
    imagefolder = rel(paths.imagefolder_train if split == "train" else paths.imagefolder_val)
    coco_images = rel(paths.coco_train_images if split == "train" else paths.coco_val_images)
    for d in [imagefolder / c for c in paths.class_names] + [
        coco_images,
        rel(paths.ade_root) / "images" / ade_split,
        rel(paths.ade_root) / "annotations" / ade_split,
    ]:
        d.mkdir(parents=True, exist_ok=True)
    for s in samples:
        (imagefolder / paths.class_names[s["label"]] / f"{s['key']}.jpg").write_bytes(s["jpeg"])
        (coco_images / s["coco_name"]).write_bytes(s["jpeg"])
        stem = f"{ade_prefix}_{s['index'] + 1:08d}"
        (rel(paths.ade_root) / "images" / ade_split / f"{stem}.jpg").write_bytes(s["jpeg"])
        (rel(paths.ade_root) / "annotations" / ade_split / f"{stem}.png").write_bytes(_png_bytes(s["seg"]))
    _write_shards(rel(paths.shards_dir if split == "train" else paths.val_shards_dir), split, samples, paths)
    json_path = rel(paths.coco_train_json if split == "train" else paths.coco_val_json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    first_ann_id = 1 if split == "train" else 1_000_000
    json_path.write_text(json.dumps(_coco_annotations(samples, paths, first_ann_id)))


def _read_stamp(root: Path) -> dict | None:
    try:
        return json.loads((root / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def make_demo_data(
    out_dir: str | os.PathLike,
    num_classes: int = 4,
    images_per_class: int = 48,
    image_size: int = 64,
    seed: int = 0,
    *,
    val_per_class: int = 12,
    images_per_shard: int = 64,
    force: bool = False,
) -> DemoPaths:
    """Build (or reuse) the demo data under `out_dir`. Default: 4 classes, 192 train + 48 val images of 64 px.

    Built in a temporary sibling folder and renamed into place, so a crash or a concurrent build
    never leaves a half-written folder that looks finished.
    """
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPES)}, got {num_classes}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    params = {
        "version": GENERATOR_VERSION,
        "num_classes": num_classes,
        "images_per_class": images_per_class,
        "val_per_class": val_per_class,
        "image_size": image_size,
        "images_per_shard": images_per_shard,
        "seed": seed,
    }
    root = Path(out_dir)
    paths = demo_paths(root, params)
    stamp = _read_stamp(root)
    if not force and stamp is not None and stamp.get("params") == params:
        return paths
    if root.exists() and any(root.iterdir()) and stamp is None:
        raise FileExistsError(f"{root} exists and holds no demo data stamp ({STAMP_NAME}); refusing to overwrite it")

    root.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{root.name}.build-", dir=root.parent))
    try:
        started = time.time()
        rng = np.random.default_rng(seed)
        train = _generate_split(rng, "train", images_per_class, paths, first_image_id=1)
        val = _generate_split(rng, "val", val_per_class, paths, first_image_id=len(train) + 1)
        _write_split(train, "train", paths, build)
        _write_split(val, "val", paths, build)
        counts = {
            "train": np.bincount([s["label"] for s in train], minlength=num_classes).tolist(),
            "val": np.bincount([s["label"] for s in val], minlength=num_classes).tolist(),
        }
        stamp = {"params": params, "class_names": paths.class_names, "counts": counts,
                 "build_seconds": round(time.time() - started, 2)}  # fmt: skip
        (build / STAMP_NAME).write_text(json.dumps(stamp, indent=1) + "\n")
        _swap_into_place(build, root, params)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return paths


def _swap_into_place(build: Path, root: Path, params: dict) -> None:
    old = None
    if root.exists():
        old = root.parent / f".{root.name}.old-{os.getpid()}-{time.monotonic_ns()}"
        try:
            root.rename(old)
        except FileNotFoundError:  # another process moved it first
            old = None
    try:
        build.rename(root)
    except OSError:
        # Another process finished first: fine if it built the same thing.
        stamp = _read_stamp(root)
        if stamp is None or stamp.get("params") != params:
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mimkit demo-data", description="build the embedded demo data")
    parser.add_argument("--out", default="runs/demo/data", help="output folder (default: %(default)s)")
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--images-per-class", type=int, default=48)
    parser.add_argument("--val-per-class", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--images-per-shard", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    args = parser.parse_args(argv)
    paths = make_demo_data(
        args.out,
        args.num_classes,
        args.images_per_class,
        args.image_size,
        args.seed,
        val_per_class=args.val_per_class,
        images_per_shard=args.images_per_shard,
        force=args.force,
    )
    info = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(paths).items()}
    info["train_shards"] = [str(p) for p in paths.train_shards]
    info["val_shards"] = [str(p) for p in paths.val_shards]
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
