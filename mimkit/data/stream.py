"""The pretraining stream: resampled WebDataset tar shards, a fixed number of batches per rank.

Why plain `tarfile` and not the `webdataset` pipeline: the loader's position must be part of the
checkpoint and resuming must be cheap and identical on every rank. This reader gives that control:

* Shards are drawn per (rank, worker) slot from a seeded, endless sequence: by default in shuffled
  *passes* over each source (all slots share the pass permutation and take every S-th entry, so
  slots read disjoint shards until a pass is used up, and never run dry), or i.i.d. with replacement
  (`resample="replacement"`, WebDataset's ResampledShards). Sources ("a::b") are picked by weight.
* Every batch reads a fixed window of the worker's shuffled sample stream: local batch `b` is made of
  raw samples [b * B, (b + 1) * B). A bad sample (missing key, undecodable) is skipped, counted and
  replaced from a side stream seeded by the batch index. So a worker's position is a function of the
  batch index alone, and the whole loader's position is just (epoch, batches served): the same on
  every rank, which matters because only rank 0 usually writes the client state of a checkpoint.
* Fast-forward on resume reads tar *headers* only (member data is seeked over, nothing decoded):
  the shuffle buffer holds (file, offset, size) references that are read when they come out.
* Augmentation randomness (`random`, `numpy`, `torch`, and a mask generator's `reseed`) is seeded per
  batch from (seed, rank, worker, epoch, batch index), so skipped batches need not be replayed.
* Each rank yields exactly `batches_per_epoch` batches per epoch whatever the shard sizes, so ranks
  never wait for each other at an epoch end. Worker w serves the global batches i with i % W == w;
  PyTorch's DataLoader delivers them round-robin, which is exactly that order.

Measured (bench/data.py, BENCHMARKS.md): reading tars with `tarfile` costs well under 5 % of the decode
and transform time, so owning the reader costs no throughput.

Skipped samples are reported by a rate-limited warning in the worker (never a sleep) and their count
travels with each batch as `batch["skipped"]` (0-d long tensor); `StreamLoader.skipped` keeps the total.
"""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import math
import os
import random
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image

from mimkit.data.masking import MaskSource
from mimkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, DeviceTransform, SecondView, build_transform
from mimkit.distributed.lifetime import worker_init_dies_with_parent
from mimkit.errors import BadValue, MissingPath

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
# What a corrupt image raises in PIL; anything else is a bug and propagates.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass
class DataConfig:
    """The `data` section of a pretraining config (OmegaConf structured)."""

    shards: str = ""  # brace patterns / files / folders of .tar; several sources joined by "::"
    weights: Optional[list[float]] = None  # one per "::" source; None: proportional to shard counts
    batch_size: int = 64  # per rank
    num_workers: int = 4
    batches_per_epoch: int = 1000  # per rank, fixed: every rank yields exactly this many
    seed: int = 0
    shuffle_buffer: int = 1000  # samples held per worker
    resample: str = "passes"  # "passes" (disjoint slots within a pass) | "replacement"
    mode: str = "worker"  # "worker": full transform in workers | "device": uint8 + DeviceTransform
    require_label: bool = False  # skip samples without .cls (else label -1)
    image_size: int = 224
    interpolation: str = "bicubic"
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    flip_prob: float = 0.5
    color_jitter: float = 0.4
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    use_draft: bool = True  # JPEG draft() decoding at reduced scale
    tok_from_image: bool = True  # a second view (BEiT's tokenizer view) resized from the ViT view (faster; ~0.4/255 change)
    pin_memory: bool = False
    prefetch_factor: int = 2
    return_keys: bool = False  # add batch["key"]: list of "shard/key" strings (tests, debugging)


def transform_options(cfg: DataConfig, second_view: SecondView | None = None) -> dict[str, Any]:
    """Keyword arguments of `build_transform` from the config and the objective's second view, if any."""
    view = second_view or SecondView(size=0)
    return dict(
        image_size=cfg.image_size, tok_size=view.size or None, interpolation=cfg.interpolation,
        tok_interpolation=view.interpolation, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio),
        flip_prob=cfg.flip_prob, color_jitter=cfg.color_jitter, use_draft=cfg.use_draft,
        tok_from_image=cfg.tok_from_image,
        mean=tuple(cfg.mean), std=tuple(cfg.std), tok_mean=tuple(view.mean), tok_std=tuple(view.std),
    )


# ----------------------------------------------------------------------------------------- shards


def expand_shards(spec: str, key: str = "data.shards") -> list[list[str]]:
    """"a-{000..009}.tar::dir/" -> one sorted list of existing .tar paths per "::" source; ``key``: the
    config key that gave ``spec``, for the messages."""
    from braceexpand import braceexpand

    sources = []
    for part in [p.strip() for p in spec.split("::") if p.strip()]:
        paths: list[str] = []
        for pattern in braceexpand(part):
            if os.path.isdir(pattern):
                paths += sorted(glob.glob(os.path.join(pattern, "*.tar")))
            elif any(c in pattern for c in "*?["):
                paths += sorted(glob.glob(pattern))
            else:
                paths.append(pattern)
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise MissingPath(f"{key}={part}: {len(missing)} shard(s) not found, e.g. {missing[0]}")
        if not paths:
            raise MissingPath(f"{key}={part}: no .tar shards there (expected a folder of .tar files, a brace "
                              "pattern or a glob)")
        sources.append(paths)
    if not sources:
        raise BadValue(f"{key} is empty: set it to the training shards (a folder of .tar files or a brace pattern)")
    return sources


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes (no hash randomisation)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


# Tags that keep the seeded streams of one (seed, rank, worker, epoch) apart.
_SOURCES, _PASS, _SHUFFLE, _BATCH, _RESCUE, _MASKS = range(6)


def shard_sequence(
    sources: list[list[str]], weights: list[float], seed: int, epoch: int, rank: int, worker: int,
    slot: int, num_slots: int, resample: str,
) -> Iterator[str]:
    """Endless shard paths for one (rank, worker) slot."""
    choose = random.Random(derive_seed(seed, _SOURCES, rank, worker, epoch))
    taken = [0] * len(sources)
    passes: dict[int, tuple[int, list[int]]] = {}  # source -> (pass number, its shard order)
    while True:
        j = choose.choices(range(len(sources)), weights)[0] if len(sources) > 1 else 0
        shards = sources[j]
        if resample == "replacement":
            yield shards[choose.randrange(len(shards))]
            continue
        index = slot + taken[j] * num_slots
        taken[j] += 1
        pass_no, pos = divmod(index, len(shards))
        if passes.get(j, (None,))[0] != pass_no:  # all slots shuffle pass p of source j alike
            order = list(range(len(shards)))
            random.Random(derive_seed(seed, _PASS, j, pass_no, epoch)).shuffle(order)
            passes[j] = (pass_no, order)
        yield shards[passes[j][1][pos]]


@dataclass
class MemberRef:
    """Where a member's bytes are, when the stream only skims headers (fast-forward)."""

    path: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset convention: "dir/key.ext.more" -> ("dir/key", "ext.more")."""
    folder, base = os.path.split(name)
    key, dot, ext = base.partition(".")
    return (os.path.join(folder, key) if folder else key), (ext.lower() if dot else "")


def read_tar_samples(path: str, load: Callable[[], bool], on_skip: Callable[[str, str], None]) -> Iterator[dict]:
    """Samples of one tar as {"__key__", "__shard__", ext: bytes | MemberRef}, in member order.

    Members are only ever read into memory, never extracted. A member whose data runs past the end
    of the file (truncated tar) ends the shard and drops the sample being assembled; the check uses
    the header alone, so skimming (`load()` False) and reading agree on which samples exist.
    """
    try:
        size = os.path.getsize(path)
        tar = tarfile.open(path, mode="r:")
    except (OSError, tarfile.TarError, EOFError) as err:
        on_skip("unreadable shard", f"{path}: {err}")
        return
    current: dict | None = None
    with tar:
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, OSError, EOFError) as err:
                member, truncated = None, str(err)
            else:
                truncated = ""
            if member is not None and member.isfile() and member.offset_data + member.size > size:
                truncated = f"member {member.name} runs past the end of the file"
            if member is None or truncated:
                if truncated:
                    on_skip("truncated tar", f"{path}: {truncated}")
                if current is not None and not truncated:
                    yield current
                return
            if not member.isfile():
                continue
            key, ext = split_member_name(member.name)
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__shard__": path}
            if load():
                try:
                    f = tar.extractfile(member)
                    current[ext] = f.read() if f is not None else b""
                except (tarfile.TarError, OSError, EOFError) as err:
                    on_skip("truncated tar", f"{path}: {err}")
                    return
            else:
                current[ext] = MemberRef(path, member.offset_data, member.size)


def shuffled(samples: Iterator[dict], buffer_size: int, rng: random.Random) -> Iterator[dict]:
    """Reservoir-style shuffle: fill `buffer_size`, then emit a random element per new one."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        i = rng.randrange(len(buffer))
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


# ----------------------------------------------------------------------------------------- skipping


class SkipCounter:
    """Counts skipped samples by reason; warns for the first few, then at most every `interval_s`."""

    def __init__(self, first: int = 5, interval_s: float = 60.0):
        self.counts: Counter[str] = Counter()
        self.first, self.interval_s = first, interval_s
        self._last = -math.inf
        self._since_batch = 0

    def __call__(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        self._since_batch += 1
        total = sum(self.counts.values())
        now = time.monotonic()
        if total <= self.first or now - self._last >= self.interval_s:
            self._last = now
            log.warning("skipped sample (%s): %s [skipped so far: %s]", reason, detail, dict(self.counts))

    def take(self) -> int:
        """Skips since the last call (the count a batch carries)."""
        n, self._since_batch = self._since_batch, 0
        return n


# ----------------------------------------------------------------------------------------- batches


@contextlib.contextmanager
def seeded_rngs(seed: int):
    """Seed `random`, `numpy` and `torch` for a block and restore them after, so the main process
    (num_workers=0) keeps its own random state."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def collate(samples: list[dict]) -> dict:
    """Stack per-sample dicts of tensors (and lists of strings) into a batch."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


class EpochStream(torch.utils.data.IterableDataset):
    """One rank's batches for one epoch, from global batch `start` on; a DataLoader worker j serves
    global batches start + j, start + j + W, ... (all from one logical worker's stream)."""

    def __init__(self, cfg: DataConfig, sources: list[list[str]], weights: list[float], transform: Callable,
                 masks: MaskSource | None, rank: int, world_size: int, epoch: int, start: int):
        super().__init__()
        self.cfg, self.sources, self.weights = cfg, sources, weights
        self.transform, self.masks = transform, masks
        self.rank, self.world_size, self.epoch, self.start = rank, world_size, epoch, start

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        workers = max(1, self.cfg.num_workers)
        physical = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)
        first = self.start + physical  # first global batch of this physical worker
        if first >= self.cfg.batches_per_epoch:
            return
        worker, local = first % workers, first // workers
        yield from WorkerStream(self, worker).batches(local, range(first, self.cfg.batches_per_epoch, workers))


class WorkerStream:
    """The sample stream of one logical worker of one rank in one epoch."""

    def __init__(self, epoch_stream: EpochStream, worker: int):
        e = epoch_stream
        self.e, self.cfg, self.worker = e, e.cfg, worker
        self.skips = SkipCounter()
        self.loading = True
        workers = max(1, self.cfg.num_workers)
        self.seed_parts = (self.cfg.seed, e.rank, worker, e.epoch)
        slot, num_slots = e.rank * workers + worker, e.world_size * workers
        shards = shard_sequence(e.sources, e.weights, self.cfg.seed, e.epoch, e.rank, worker, slot, num_slots,
                                self.cfg.resample)
        shuffle_rng = random.Random(derive_seed(self.cfg.seed, _SHUFFLE, e.rank, worker, e.epoch))
        self.samples = shuffled(self._raw(shards), self.cfg.shuffle_buffer, shuffle_rng)

    def _raw(self, shards: Iterator[str]) -> Iterator[dict]:
        """Samples of consecutive shards; gives up when many shards in a row hold no sample."""
        empty_run, limit = 0, max(50, 4 * sum(len(s) for s in self.e.sources))
        for path in shards:
            got = False
            for sample in read_tar_samples(path, lambda: self.loading, self.skips):
                got = True
                yield sample
            empty_run = 0 if got else empty_run + 1
            if empty_run >= limit:
                raise RuntimeError(f"{limit} shards in a row gave no sample (last: {path}); see warnings")

    def batches(self, local: int, global_indices: range) -> Iterator[dict]:
        B = self.cfg.batch_size
        self.loading = False  # fast-forward: skim headers of the windows already served
        for _ in range(local * B):
            next(self.samples)
        self.loading = True
        for _ in global_indices:
            yield self._batch(local, [next(self.samples) for _ in range(B)])
            local += 1

    def _batch(self, local: int, window: list[dict]) -> dict:
        batch_seed = derive_seed(*self.seed_parts, _BATCH, local)
        with seeded_rngs(batch_seed):
            good = [s for s in (self._prepare(raw) for raw in window) if s is not None]
            if len(good) < len(window):
                good += self._rescue(local, len(window) - len(good))
        batch = collate(good)
        if self.e.masks is not None:  # on its own generator: the images do not depend on the mask source
            generator = torch.Generator().manual_seed(derive_seed(*self.seed_parts, _MASKS, local))
            batch.update(self.e.masks(len(good), generator))
        batch["skipped"] = torch.tensor(self.skips.take(), dtype=torch.long)
        return batch

    def _rescue(self, local: int, needed: int) -> list[dict]:
        """Stand-ins for skipped samples from a side stream of shards seeded by the batch index, so the
        main stream's position stays a function of the batch index alone."""
        chooser = random.Random(derive_seed(*self.seed_parts, _RESCUE, local))
        flat = [p for source in self.e.sources for p in source]
        out: list[dict] = []
        budget = 100 * needed + 1000  # samples (or empty shards) tried before giving up
        while len(out) < needed and budget > 0:
            budget -= 1
            for raw in read_tar_samples(flat[chooser.randrange(len(flat))], lambda: True, self.skips):
                sample, budget = self._prepare(raw), budget - 1
                if sample is not None:
                    out.append(sample)
                if len(out) == needed or budget <= 0:
                    break
        if len(out) < needed:
            raise RuntimeError(f"no decodable samples left after skipping {sum(self.skips.counts.values())}; "
                               f"reasons: {dict(self.skips.counts)}")
        return out

    def _prepare(self, raw: dict) -> dict | None:
        """Raw sample -> transformed dict, or None (skipped and counted)."""
        name = f"{raw['__shard__']}:{raw['__key__']}"
        ext = next((k for k in IMAGE_KEYS if k in raw), None)
        if ext is None:
            self.skips("missing image", name)
            return None
        if self.cfg.require_label and "cls" not in raw:
            self.skips("missing label", name)
            return None
        data = {k: (v.read() if isinstance(v, MemberRef) else v) for k, v in raw.items() if k in (ext, "cls")}
        try:
            label = int(data["cls"].decode().strip()) if "cls" in data else -1
        except (UnicodeDecodeError, ValueError):
            self.skips("bad label", name)
            return None
        try:
            with Image.open(io.BytesIO(data[ext])) as img:
                sample = self.e.transform(img)
        except DECODE_ERRORS as err:
            self.skips("undecodable image", f"{name}: {type(err).__name__}: {err}")
            return None
        sample["label"] = torch.tensor(label, dtype=torch.long)
        if self.cfg.return_keys:
            sample["key"] = f"{os.path.basename(raw['__shard__'])}/{raw['__key__']}"
        return sample


# ----------------------------------------------------------------------------------------- loader


class StreamLoader:
    """Iterate for one epoch (the rest of the current one after a resume); the position is
    `state_dict()` = {"epoch", "batch", "seed", "skipped"}, identical on every rank."""

    def __init__(self, cfg: DataConfig, transform: Callable | None = None, rank: int = 0, world_size: int = 1,
                 masks: MaskSource | None = None, second_view: SecondView | None = None):
        if cfg.mode not in ("worker", "device"):
            raise ValueError(f"data.mode must be 'worker' or 'device', got '{cfg.mode}'")
        if cfg.resample not in ("passes", "replacement"):
            raise ValueError(f"data.resample must be 'passes' or 'replacement', got '{cfg.resample}'")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.sources = expand_shards(cfg.shards)
        weights = list(cfg.weights) if cfg.weights else [float(len(s)) for s in self.sources]
        if len(weights) != len(self.sources) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"data.weights needs {len(self.sources)} non-negative values, got {weights}")
        self.weights = weights
        opts = transform_options(cfg, second_view)
        self.transform = transform if transform is not None else build_transform(cfg.mode, **opts)
        self.masks = masks
        self.device_transform = DeviceTransform(opts["mean"], opts["std"], opts["tok_mean"], opts["tok_std"],
                                                color_jitter=cfg.color_jitter)
        self.epoch, self.batch, self.skipped = 0, 0, 0

    def __len__(self) -> int:
        return self.cfg.batches_per_epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.cfg.seed, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["seed"]) != self.cfg.seed:
            raise ValueError(f"data position was saved with seed {state['seed']}, config has {self.cfg.seed}")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.skipped = int(state.get("skipped", 0))

    def __iter__(self) -> Iterator[dict]:
        if self.batch >= self.cfg.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        dataset = EpochStream(self.cfg, self.sources, self.weights, self.transform, self.masks,
                              self.rank, self.world_size, self.epoch, self.batch)
        if self.cfg.num_workers > 0:
            batches: Any = torch.utils.data.DataLoader(
                dataset, batch_size=None, num_workers=self.cfg.num_workers, pin_memory=self.cfg.pin_memory,
                prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False,
                # a SIGKILLed rank must not leave workers holding its sockets (and GPU) open
                worker_init_fn=worker_init_dies_with_parent())
        else:
            batches = dataset
        for batch in batches:
            self.batch += 1
            self.skipped += int(batch["skipped"])
            yield batch
        if self.batch >= self.cfg.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0


def build_stream(cfg: DataConfig, transform: Callable | None = None, rank: int = 0, world_size: int = 1,
                 masks: MaskSource | None = None, second_view: SecondView | None = None) -> StreamLoader:
    """The rank's loader. `transform(PIL image, opened not loaded) -> dict of tensors`; default from the
    config, `cfg.mode` and `second_view` (adds "image_tok": BEiT's tokenizer view). `masks` (a mask source
    that needs no scores) adds "mask" [B, N] and "ids_keep" [B, K] to every batch, drawn in the worker.
    In device mode call `loader.device_transform(batch)` on the training device (in worker mode it passes
    batches through)."""
    if masks is not None and masks.needs_scores:
        raise ValueError("this mask source needs the targets' scores: the trainer draws it, not the stream")
    return StreamLoader(cfg, transform, rank, world_size, masks, second_view)
