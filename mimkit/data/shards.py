"""`mimkit shards`: an ImageFolder, a flat folder or a file list to WebDataset tar shards.

    mimkit shards imagefolder DIR --out OUT [--maxcount N] [--maxsize BYTES] [--prefix NAME] [--workers N]
    mimkit shards filelist FILE --out OUT          # lines "path[<TAB>label]", label an int or a class name
    mimkit shards ade ROOT --split training --out OUT   # ADEChallengeData2016: KEY.jpg + KEY.seg.png

DIR with class sub-folders gives labelled samples; a flat DIR (images, no class folders: the usual
pretraining input) gives unlabelled ones. OUT is a local folder or an fsspec URL (`s3://bucket/set`,
`gs://...`): each shard is written locally, then uploaded and removed. An input without images is
refused (exit 2).

Each sample is `KEY.jpg` (the original bytes when the file is a decodable RGB JPEG, else re-encoded as
RGB JPEG quality 95), `KEY.cls` (class index, absent when unlabelled) and `KEY.json` (original path,
class name); segmentation shards hold `KEY.jpg` and `KEY.seg.png` (the annotation PNG's own bytes) instead.
Keys are zero-padded sample numbers: no dots, no folders. The output folder also gets
`sizes.json` ({shard file: sample count}) and `classes.json` (class names, index = label).
Every image is fully decoded once here, so undecodable files are found now (reported: count and the
first few names) and never written. ImageFolder input is shuffled by default: a streaming shuffle
buffer cannot mix classes that sit in different shards.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import sys
import tarfile
import tempfile
from multiprocessing import Pool
from pathlib import Path
from typing import Iterable, Union

from PIL import Image

from mimkit.data.transforms import to_rgb
from mimkit.runlog import progress as progress_bar

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
Source = Union[str, os.PathLike, bytes, Image.Image]


def jpeg_payload(source: Source) -> bytes:
    """JPEG bytes of an image: passed through when already a decodable RGB JPEG, else re-encoded (q95).

    Raises OSError / ValueError (and PIL's decode errors) when the image cannot be decoded.
    """
    if isinstance(source, Image.Image):
        img, raw = source, None
    else:
        raw = source if isinstance(source, bytes) else Path(source).read_bytes()
        img = Image.open(io.BytesIO(raw))
    with img:
        img.load()  # a full decode: truncated files fail here, not in training
        if raw is not None and img.format == "JPEG" and img.mode == "RGB":
            return raw
        out = io.BytesIO()
        to_rgb(img).save(out, format="JPEG", quality=95)
        return out.getvalue()


def _encode(item: tuple) -> tuple[bytes | None, str]:
    """Worker body: (index, source, ...) -> (payload or None, error text)."""
    try:
        return jpeg_payload(item[1]), ""
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        return None, f"{type(err).__name__}: {err}"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed mtime: same input, same bytes
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Rolls `PREFIX-000000.tar`, ... by sample count and byte size; each shard is written to a
    temporary name and renamed when complete, so a crash never leaves a truncated shard. `publish(path)`
    (optional) is called with each complete shard (an upload)."""

    def __init__(self, out_dir: Path, prefix: str, maxcount: int, maxsize: int, publish=None):
        self.out_dir, self.prefix, self.maxcount, self.maxsize = out_dir, prefix, maxcount, maxsize
        self.publish = publish
        self.sizes: dict[str, int] = {}
        self.tar: tarfile.TarFile | None = None
        self.name, self.count, self.bytes = "", 0, 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        size = sum(len(v) + 1024 for v in members.values())  # + headers and padding, roughly
        if self.tar is not None and (self.count >= self.maxcount or self.bytes + size > self.maxsize):
            self.close()
        if self.tar is None:
            self.name = f"{self.prefix}-{len(self.sizes):06d}.tar"
            self.tar = tarfile.open(self.out_dir / f"{self.name}.tmp", "w", format=tarfile.USTAR_FORMAT)
            self.count = self.bytes = 0
        for ext, data in members.items():
            _add_member(self.tar, f"{key}.{ext}", data)
        self.count, self.bytes = self.count + 1, self.bytes + size

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        os.replace(self.out_dir / f"{self.name}.tmp", self.out_dir / self.name)
        if self.publish is not None:
            self.publish(self.out_dir / self.name)
        self.sizes[self.name] = self.count
        self.tar = None


class Destination:
    """Where shards go: a local folder, or an fsspec URL (shards staged in a local temporary folder,
    uploaded when complete, then removed)."""

    def __init__(self, out: str | os.PathLike):
        from mimkit.data.sources import filesystem, is_url

        self.url = str(out).rstrip("/") if is_url(str(out)) else None
        if self.url is None:
            self.folder = Path(out)
            self.folder.mkdir(parents=True, exist_ok=True)
            self.fs = None
        else:
            self.fs = filesystem(self.url)
            self.folder = Path(tempfile.mkdtemp(prefix="mimkit-shards-"))

    def publish(self, path: Path) -> None:
        if self.fs is not None:
            self.fs.put_file(str(path), f"{self.url}/{path.name}")
            path.unlink()

    def write_text(self, name: str, text: str) -> None:
        if self.fs is None:
            (self.folder / name).write_text(text)
        else:
            self.fs.pipe(f"{self.url}/{name}", text.encode())

    def close(self) -> None:
        if self.fs is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def write_shards(
    items: Iterable[tuple], out_dir: str | os.PathLike, maxcount: int = 10000, maxsize: int = 1_000_000_000,
    prefix: str = "shard", classes: list[str] | None = None, metadata: bool = True, workers: int = 0,
    progress: bool = True, total: int | None = None,
) -> dict:
    """Write shards from `items`: (source, label) or (source, label, name) tuples.

    `source` is a path, encoded bytes or a PIL image; `label` an int (None or -1: unlabelled);
    `name` goes into the metadata (default: the path). `workers` > 0 encodes in a process pool.
    `out_dir` is a local folder or an fsspec URL. Returns {"sizes": {shard: count}, "written": n,
    "skipped": [(name, error), ...], "classes": [...]}.
    """
    dest = Destination(out_dir)
    try:
        return _write(items, dest, out_dir, maxcount, maxsize, prefix, classes, metadata, workers, progress, total)
    finally:
        dest.close()


def _write(items, dest: Destination, out, maxcount, maxsize, prefix, classes, metadata, workers, progress,
           total) -> dict:
    writer = ShardWriter(dest.folder, prefix, maxcount, maxsize, publish=dest.publish)
    skipped: list[tuple[str, str]] = []
    written = 0

    if workers > 0:
        items = list(items)  # read twice: by the pool and by the loop below
    pool = Pool(workers) if workers > 0 else None
    try:
        numbered = ((i, *item) for i, item in enumerate(items))
        results = pool.imap(_encode, ((i, item[0]) for i, item in enumerate(items)), chunksize=8) if pool else None
        bar = progress_bar(total=total, desc=f"shards -> {out}", enabled=progress, unit="img")
        for item in numbered:
            payload, error = next(results) if pool else _encode(item)
            index, source, label = item[0], item[1], item[2] if len(item) > 2 else None
            name = item[3] if len(item) > 3 else (str(source) if isinstance(source, (str, os.PathLike)) else f"#{index}")
            bar.update(1)
            if payload is None:
                skipped.append((name, error))
                continue
            members = {"jpg": payload}
            if label is not None and int(label) >= 0:
                members["cls"] = str(int(label)).encode()
            if metadata:
                meta = {"path": name}
                if classes is not None and label is not None and 0 <= int(label) < len(classes):
                    meta["class"] = classes[int(label)]
                members["json"] = json.dumps(meta, sort_keys=True).encode()
            writer.write(f"{written:09d}", members)
            written += 1
        bar.close()
    finally:
        writer.close()
        if pool is not None:
            pool.close()
            pool.join()
    dest.write_text("sizes.json", json.dumps(writer.sizes, indent=1) + "\n")
    if classes is not None:
        dest.write_text("classes.json", json.dumps(list(classes), indent=1) + "\n")
    return {"sizes": writer.sizes, "written": written, "skipped": skipped, "classes": classes}


def _images_under(folder: Path) -> list[str]:
    return [os.path.join(dirpath, f) for dirpath, _, files in sorted(os.walk(folder, followlinks=True))
            for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]


def scan_imagefolder(root: Path) -> tuple[list[tuple[str, int | None]], list[str] | None]:
    """ROOT/CLASS/**/IMAGE -> ([(path, label)], sorted class names), like torchvision's ImageFolder; a
    flat ROOT (images directly in it) -> ([(path, None)] for every image under it, None): unlabelled."""
    if any(f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS) for f in root.iterdir()):
        return [(p, None) for p in _images_under(root)], None
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    return [(p, label) for label, name in enumerate(classes) for p in _images_under(root / name)], classes


def read_filelist(path: Path) -> tuple[list[tuple[str, int | None]], list[str] | None]:
    """Lines "path[<TAB>label]" (relative paths are relative to the list's folder). Labels that are
    all integers are used as they are; otherwise they are class names, numbered in sorted order."""
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        file, _, label = line.partition("\t")
        file = file.strip()
        rows.append((file if os.path.isabs(file) else str(path.parent / file), label.strip() or None))
    labels = [lab for _, lab in rows if lab is not None]
    if all(lab.lstrip("-").isdigit() for lab in labels):
        numbers = [int(lab) for lab in labels]
        classes = [str(i) for i in range(max(numbers) + 1)] if numbers else None
        return [(f, int(lab) if lab is not None else None) for f, lab in rows], classes
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    return [(f, index[lab] if lab is not None else None) for f, lab in rows], classes


def write_segmentation_shards(pairs: Iterable[tuple[Source, Union[str, os.PathLike, bytes]]], out_dir: str | os.PathLike,
                              maxcount: int = 10000, maxsize: int = 1_000_000_000, prefix: str = "shard") -> dict:
    """Shards of (image, annotation PNG) pairs: `KEY.jpg` (as `jpeg_payload`) + `KEY.seg.png` (the PNG's
    bytes, checked to be a single-channel image of the image's size). Returns {"sizes", "written"}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, prefix, maxcount, maxsize)
    written = 0
    for i, (image, label) in enumerate(pairs):
        jpeg = jpeg_payload(image)
        png = label if isinstance(label, bytes) else Path(label).read_bytes()
        with Image.open(io.BytesIO(jpeg)) as img, Image.open(io.BytesIO(png)) as seg:
            if seg.format != "PNG" or seg.mode not in ("L", "P") or seg.size != img.size:
                raise ValueError(f"pair {i}: the annotation must be a one-channel PNG of the image's size "
                                 f"(got {seg.format} {seg.mode} {seg.size} for an image of {img.size})")
        writer.write(f"{i:08d}", {"jpg": jpeg, "seg.png": png})
        written += 1
    writer.close()
    (out / "sizes.json").write_text(json.dumps(writer.sizes, indent=1))
    return {"sizes": writer.sizes, "written": written}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mimkit shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["imagefolder", "filelist", "ade"])
    parser.add_argument("source", type=Path, help="ImageFolder root (or a flat folder: unlabelled), the file list, "
                        "or ADEChallengeData2016")
    parser.add_argument("--split", default="training", help="ade: training | validation")
    parser.add_argument("--out", required=True, help="a local folder or an fsspec URL (s3://bucket/set)")
    parser.add_argument("--maxcount", type=int, default=10000, help="samples per shard (at most)")
    parser.add_argument("--maxsize", type=int, default=1_000_000_000, help="bytes per shard (about)")
    parser.add_argument("--prefix", default="shard")
    parser.add_argument("--workers", type=int, default=0, help="encode in N processes")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the input order")
    parser.add_argument("--no-json", action="store_true", help="omit the .json metadata")
    args = parser.parse_args(argv)

    if args.kind == "ade":
        images, labels = args.source / "images" / args.split, args.source / "annotations" / args.split
        if not images.is_dir() or not labels.is_dir():
            print(f"mimkit shards: expected {images} and {labels}", file=sys.stderr)
            return 2
        pairs = [(p, labels / f"{p.stem}.png") for p in sorted(images.glob("*.jpg")) if (labels / f"{p.stem}.png").is_file()]
        result = write_segmentation_shards(pairs, args.out, args.maxcount, args.maxsize, args.prefix)
        print(f"wrote {result['written']} image + annotation pairs in {len(result['sizes'])} shards to {args.out}")
        return 0
    if args.kind == "imagefolder":
        if not args.source.is_dir():
            print(f"mimkit shards: not a folder: {args.source}", file=sys.stderr)
            return 2
        rows, classes = scan_imagefolder(args.source)
        items = [(p, lab, os.path.relpath(p, args.source)) for p, lab in rows]
    else:
        if not args.source.is_file():
            print(f"mimkit shards: no such file list: {args.source}", file=sys.stderr)
            return 2
        rows2, classes = read_filelist(args.source)
        items = [(p, lab, p) for p, lab in rows2]
    if not items:
        print(f"mimkit shards: no images in {args.source} (extensions {' '.join(IMAGE_EXTENSIONS)})",
              file=sys.stderr)
        return 2
    if not args.no_shuffle:
        random.Random(args.seed).shuffle(items)
    result = write_shards(items, args.out, args.maxcount, args.maxsize, args.prefix, classes,
                          metadata=not args.no_json, workers=args.workers, total=len(items))
    labelled = "unlabelled" if classes is None else f"{len(classes)} classes"
    print(f"wrote {result['written']} samples ({labelled}) in {len(result['sizes'])} shards to {args.out}")
    if result["skipped"]:
        first = "; ".join(f"{n} ({e})" for n, e in result["skipped"][:5])
        print(f"skipped {len(result['skipped'])} undecodable image(s): {first}"
              + (" ..." if len(result["skipped"]) > 5 else ""), file=sys.stderr)
    return 0 if result["written"] else 1
