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
  never wait for each other at an epoch end. A resume on another world size continues by samples
  (`StreamLoader`: the rest of the epoch is resampled). Worker w serves the global batches i with i % W == w;
  PyTorch's DataLoader delivers them round-robin, which is exactly that order.

Measured (bench/data.py, BENCHMARKS.md): reading tars with `tarfile` costs well under 5 % of the decode
and transform time, so owning the reader costs no throughput.

Shards are found and read by `mimkit.data.sources` (local, `.tar.gz`, `pipe:`, fsspec URLs; fast-forward
skims headers of local uncompressed tars only, streams are read through). A pipe or URL shard that fails
is read again `RETRY_AFTER` shards later, at most `shard_retries` times (the samples it gave before failing
come again). The position stays a function of the batch index as long as the data fails the same way:
a transient failure makes the stream after it differ from an uninterrupted run's.

Skipped samples (and failed shards) are reported by a rate-limited warning in the worker (never a sleep)
and their counts travel with each batch: `batch["skipped"]` (0-d long tensor, the total) and
`batch["skipped_by"]` (one count per `SKIP_REASONS` entry); `StreamLoader.skipped` / `.skipped_by` keep
this process's totals, `skip_totals` sums them over ranks for a run's closing record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image

from mimkit.data.masking import MaskSource
from mimkit.data.sources import (
    DECODE_ERRORS, SKIP_REASONS, BadLabel, LabelReader, expand_shards, find_classes, image_key, is_local_tar,
    member_bytes, read_shard, read_sizes, skip_key,
)
from mimkit.data.transforms import (
    DATA_MODES, IMAGENET_MEAN, IMAGENET_STD, RAGGED_KEYS, TORCH_MODES, SecondView, build_device_transform,
    build_transform,
)
from mimkit.distributed.lifetime import worker_init_dies_with_parent
from mimkit.errors import BadValue

log = logging.getLogger(__name__)

DEFAULT_BATCHES_PER_EPOCH = 1000  # when neither data.num_samples nor sizes.json tells the epoch length
RETRY_AFTER = 4  # a failed stream (pipe, URL) is read again after this many further shards


@dataclass
class DataConfig:
    """The `data` section of a pretraining config (OmegaConf structured)."""

    shards: str = ""  # brace patterns over .tar / .tar.gz / .tgz files, folders, pipe:COMMAND, fsspec URLs (s3://, gs://, https://); sources joined by "::"
    weights: Optional[list[float]] = None  # one per "::" source; None: proportional to shard counts
    batch_size: int = 64  # per rank
    num_workers: int = 4
    batches_per_epoch: int = 0  # per rank, fixed: every rank yields exactly this many; 0: num_samples / (batch_size x ranks)
    num_samples: int = 0  # samples in one epoch over all shards; 0: from sizes.json beside the shards (else 1000 batches)
    shard_retries: int = 2  # a pipe / URL shard that fails is read again later in the epoch, at most this often
    seed: int = 0
    shuffle_buffer: int = 1000  # samples held per worker
    resample: str = "passes"  # "passes" (disjoint slots within a pass) | "replacement"
    mode: str = "worker"  # "worker": full transform in workers | "device": uint8 views + DeviceTransform | "decode_on_device": JPEG bytes, decoded batched on the GPU (DeviceDecodeTransform)
    labels: bool = False  # read labels into batch["label"] (pretraining needs none: -1, nothing parsed)
    require_label: bool = False  # skip samples without a label (implies labels)
    classes: str = ""  # class-name labels: a classes file (JSON list / object, or one name a line); "": classes.json beside the shards
    image_size: int = 224
    interpolation: str = "bicubic"
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    flip_prob: float = 0.5
    color_jitter: float = 0.4
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    use_draft: bool = True  # JPEG draft() decoding at reduced scale (not in decode_on_device: the device decodes in full)
    tok_from_image: bool = True  # a second view (BEiT's tokenizer view) resized from the ViT view (faster; ~0.4/255 change)
    pin_memory: Optional[bool] = None  # page-locked batches; None: where they go to a GPU (the stream's device)
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
    """Counts skips by reason (`SKIP_REASONS`: samples, and shards that failed); warns for the first few,
    then at most every `interval_s`; `warn=False`: counts only (the caller reports them)."""

    def __init__(self, first: int = 5, interval_s: float = 60.0, warn: bool = True):
        self.counts: Counter[str] = Counter()
        self.first, self.interval_s, self.warn = first, interval_s, warn
        self._last = -math.inf
        self._since_batch: Counter[str] = Counter()

    def __call__(self, reason: str, detail: str) -> None:
        assert reason in SKIP_REASONS, reason
        self.counts[reason] += 1
        self._since_batch[reason] += 1
        total = sum(self.counts.values())
        now = time.monotonic()
        if self.warn and (total <= self.first or now - self._last >= self.interval_s):
            self._last = now
            log.warning("skipped (%s): %s [skipped so far: %s]", reason, detail, dict(self.counts))

    def take(self) -> torch.Tensor:
        """Skips since the last call, one count per `SKIP_REASONS` entry (what a batch carries)."""
        out = torch.tensor([self._since_batch[r] for r in SKIP_REASONS], dtype=torch.long)
        self._since_batch.clear()
        return out


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
    """Stack per-sample dicts of tensors (and lists of strings) into a batch; a `RAGGED_KEYS` entry (encoded
    bytes of varying length) is concatenated, with each sample's length in KEY_sizes."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key in RAGGED_KEYS:
            out[key] = torch.cat(values)
            out[key + "_sizes"] = torch.tensor([len(v) for v in values], dtype=torch.long)
        else:
            out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


class EpochStream(torch.utils.data.IterableDataset):
    """One rank's batches for one epoch, from global batch `start` on; a DataLoader worker j serves
    global batches start + j, start + j + W, ... (all from one logical worker's stream)."""

    def __init__(self, cfg: DataConfig, sources: list[list[str]], weights: list[float], transform: Callable,
                 masks: MaskSource | None, rank: int, world_size: int, epoch: int, start: int,
                 labels: LabelReader | None = None, batches: int | None = None):
        super().__init__()
        self.cfg, self.sources, self.weights, self.labels = cfg, sources, weights, labels
        self.transform, self.masks = transform, masks
        self.rank, self.world_size, self.epoch, self.start = rank, world_size, epoch, start
        self.batches = cfg.batches_per_epoch if batches is None else batches  # this rank's, in this epoch

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        workers = max(1, self.cfg.num_workers)
        physical = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)
        first = self.start + physical  # first global batch of this physical worker
        if first >= self.batches:
            return
        worker, local = first % workers, first // workers
        yield from WorkerStream(self, worker).batches(local, range(first, self.batches, workers))


class WorkerStream:
    """The sample stream of one logical worker of one rank in one epoch."""

    def __init__(self, epoch_stream: EpochStream, worker: int):
        e = epoch_stream
        self.e, self.cfg, self.worker = e, e.cfg, worker
        self.skips = SkipCounter()
        self.loading = True
        self.needs_bytes = getattr(e.transform, "needs_bytes", False)
        workers = max(1, self.cfg.num_workers)
        self.seed_parts = (self.cfg.seed, e.rank, worker, e.epoch)
        slot, num_slots = e.rank * workers + worker, e.world_size * workers
        shards = shard_sequence(e.sources, e.weights, self.cfg.seed, e.epoch, e.rank, worker, slot, num_slots,
                                self.cfg.resample)
        shuffle_rng = random.Random(derive_seed(self.cfg.seed, _SHUFFLE, e.rank, worker, e.epoch))
        self.samples = shuffled(self._raw(shards), self.cfg.shuffle_buffer, shuffle_rng)

    def _raw(self, shards: Iterator[str]) -> Iterator[dict]:
        """Samples of consecutive shards. A pipe or URL shard that fails (cannot be opened, dies
        mid-stream) comes back `RETRY_AFTER` shards later, at most `shard_retries` times (its samples
        before the failure are read again); gives up when many shards in a row hold no sample."""
        empty_run, limit = 0, max(50, 4 * sum(len(s) for s in self.e.sources))
        pending: list[tuple[int, str, int]] = []  # (due at shard count, path, attempt)
        count = 0
        for fresh in shards:
            due = [p for p in pending if p[0] <= count]
            pending = [p for p in pending if p[0] > count]
            for _, path, attempt in due + [(count, fresh, 0)]:
                reader = read_shard(path, lambda: self.loading, self.skips)
                got = False
                try:
                    while True:
                        try:
                            sample = next(reader)
                        except StopIteration as stop:
                            failure = stop.value
                            break
                        got = True
                        yield sample
                finally:  # the epoch may end mid-shard: a pipe's command is ended now, not at collection
                    reader.close()
                count += 1
                if failure is not None and not is_local_tar(path) and attempt < self.cfg.shard_retries:
                    pending.append((count + RETRY_AFTER, path, attempt + 1))
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
        by_reason = self.skips.take()
        batch["skipped"], batch["skipped_by"] = by_reason.sum(), by_reason
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
            for raw in read_shard(flat[chooser.randrange(len(flat))], lambda: True, self.skips):
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
        ext = image_key(raw)
        if ext is None:
            self.skips("missing image", name)
            return None
        label = -1
        if self.e.labels is not None:  # only a stage that asks for labels parses them
            try:
                found = self.e.labels({k: member_bytes(raw[k]) for k in self.e.labels.keys() if k in raw})
            except BadLabel as err:
                self.skips("bad label", f"{name}: {err}")
                return None
            if found is None and self.cfg.require_label:
                self.skips("missing label", name)
                return None
            label = -1 if found is None else found
        try:
            data = member_bytes(raw[ext])
            with Image.open(io.BytesIO(data)) as img:  # decode_on_device: the worker half takes the bytes too
                sample = self.e.transform(img, data) if self.needs_bytes else self.e.transform(img)
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
    `state_dict()`, identical on every rank.

    An epoch is `batches_per_epoch` batches on every rank, so `batches_per_epoch x batch_size x world_size`
    samples. A resume on the same world size and per-rank batch size continues exactly where the stream
    stopped. On another one (`load_state_dict` sees it) the stream continues by samples: the rest of the
    epoch, from the samples already served to the epoch's end, is *resampled*: every new (rank, worker)
    draws fresh shard orders seeded by (seed, epoch, the sample offset where the new layout starts, rank,
    worker), and the epoch ends after the same number of samples, rounded up to a whole global batch of the
    new layout; the epochs after it are ordinary epochs of the new layout. Samples served before the change
    may come again in the resampled part (as with any resampling)."""

    def __init__(self, cfg: DataConfig, transform: Callable | None = None, rank: int = 0, world_size: int = 1,
                 masks: MaskSource | None = None, second_view: SecondView | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if cfg.mode not in DATA_MODES:
            raise BadValue(f"data.mode={cfg.mode}: expected one of {', '.join(DATA_MODES)}")
        if cfg.mode == "decode_on_device" and cfg.interpolation not in TORCH_MODES:
            raise BadValue(f"data.interpolation={cfg.interpolation}: data.mode=decode_on_device resizes with "
                           f"{' or '.join(TORCH_MODES)}")
        if cfg.resample not in ("passes", "replacement"):
            raise ValueError(f"data.resample must be 'passes' or 'replacement', got '{cfg.resample}'")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.rank, self.world_size = rank, world_size
        self.sources = expand_shards(cfg.shards)
        self.cfg = dataclasses.replace(cfg, batches_per_epoch=epoch_length(cfg, self.sources, world_size, rank))
        self.labels = LabelReader(find_classes(self.sources, cfg.classes)) if cfg.labels or cfg.require_label else None
        weights = list(cfg.weights) if cfg.weights else [float(len(s)) for s in self.sources]
        if len(weights) != len(self.sources) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"data.weights needs {len(self.sources)} non-negative values, got {weights}")
        self.weights = weights
        opts = transform_options(cfg, second_view)
        self.transform = transform if transform is not None else build_transform(cfg.mode, **opts)
        self.masks = masks
        # on the training device: uint8 batches (or JPEG bytes, decoded there) become floats of the model's dtype there
        self.device_transform = build_device_transform(cfg.mode, dtype=dtype, **opts).to(device)
        if cfg.mode == "decode_on_device":  # a JPEG the device decoder rejects is a skip of this process
            self.device_transform.on_reject = self._count_rejected_on_device
        self.pin_memory = cfg.pin_memory if cfg.pin_memory is not None else torch.device(device).type == "cuda"
        self.epoch, self.batch, self.skipped = 0, 0, 0
        self.skipped_by = torch.zeros(len(SKIP_REASONS), dtype=torch.long)  # this process, since the run began
        # The samples of the current epoch this layout serves, [start, end); start > 0 only in an epoch resampled
        # after a world-size (or batch-size) change.
        self.span = (0, self.epoch_samples)

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.world_size

    @property
    def epoch_samples(self) -> int:
        return self.cfg.batches_per_epoch * self.global_batch

    @property
    def batches_this_epoch(self) -> int:
        """This rank's batches in the current epoch: `batches_per_epoch`, or in a resampled epoch what covers
        the rest of its samples."""
        start, end = self.span
        return -(-(end - start) // self.global_batch)

    def __len__(self) -> int:
        return self.cfg.batches_per_epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.cfg.seed, "skipped": self.skipped,
                "skipped_by": dict(zip(SKIP_REASONS, self.skipped_by.tolist())),
                "world_size": self.world_size, "batch_size": self.cfg.batch_size,
                "span_start": self.span[0], "span_end": self.span[1]}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["seed"]) != self.cfg.seed:
            raise ValueError(f"data position was saved with seed {state['seed']}, config has {self.cfg.seed}")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.skipped = int(state.get("skipped", 0))
        by = state.get("skipped_by", {})
        self.skipped_by = torch.tensor([int(by.get(r, 0)) for r in SKIP_REASONS], dtype=torch.long)
        world, size = int(state.get("world_size", self.world_size)), int(state.get("batch_size", self.cfg.batch_size))
        start = int(state.get("span_start", 0))
        end = int(state.get("span_end", self.cfg.batches_per_epoch * size * world))
        if (world, size) == (self.world_size, self.cfg.batch_size):
            self.span = (start, end)
            return
        served = start + self.batch * size * world  # samples of this epoch served before the change
        if served >= end:
            self.epoch, self.batch, self.span = self.epoch + 1, 0, (0, self.epoch_samples)
        else:
            self.batch, self.span = 0, (served, end)

    def _count_rejected_on_device(self) -> None:
        self.skipped += 1
        self.skipped_by[SKIP_REASONS.index("undecodable image")] += 1

    def _next_epoch(self) -> None:
        self.epoch, self.batch, self.span = self.epoch + 1, 0, (0, self.epoch_samples)

    def __iter__(self) -> Iterator[dict]:
        if self.batch >= self.batches_this_epoch:
            self._next_epoch()
        # a resampled epoch draws fresh seeded orders: its seeds take the epoch and the offset it starts at
        seed_epoch = self.epoch if self.span[0] == 0 else derive_seed(self.epoch, self.span[0])
        dataset = EpochStream(self.cfg, self.sources, self.weights, self.transform, self.masks,
                              self.rank, self.world_size, seed_epoch, self.batch, self.labels, self.batches_this_epoch)
        if self.cfg.num_workers > 0:
            batches: Any = torch.utils.data.DataLoader(
                dataset, batch_size=None, num_workers=self.cfg.num_workers, pin_memory=self.pin_memory,
                prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False,
                # a SIGKILLed rank must not leave workers holding its sockets (and GPU) open
                worker_init_fn=worker_init_dies_with_parent())
        else:
            batches = dataset
        for batch in batches:
            self.batch += 1
            self.skipped += int(batch["skipped"])
            self.skipped_by += batch["skipped_by"]
            yield batch
        if self.batch >= self.batches_this_epoch:
            self._next_epoch()


def epoch_length(cfg: DataConfig, sources: list[list[str]], world_size: int, rank: int = 0) -> int:
    """Batches per rank per epoch: `batches_per_epoch`, else `num_samples` (else the sizes.json files beside
    the shards) over the global batch, else DEFAULT_BATCHES_PER_EPOCH; rank 0 says which it used."""
    if cfg.batches_per_epoch > 0:
        return cfg.batches_per_epoch
    samples, origin = cfg.num_samples, "data.num_samples"
    if samples <= 0:
        samples, origin = (read_sizes(sources) or 0), "sizes.json beside the shards"
    if samples > 0:
        batches = max(1, samples // (cfg.batch_size * world_size))
        why = f"{samples} samples ({origin}) / ({cfg.batch_size} x {world_size} ranks)"
    else:
        batches = DEFAULT_BATCHES_PER_EPOCH
        why = "no data.batches_per_epoch, data.num_samples or sizes.json beside the shards: the default"
    if rank == 0:
        print(f"[data] epoch = {batches} batches per rank: {why}", flush=True)
    return batches


def build_stream(cfg: DataConfig, transform: Callable | None = None, rank: int = 0, world_size: int = 1,
                 masks: MaskSource | None = None, second_view: SecondView | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> StreamLoader:
    """The rank's loader. `transform(PIL image, opened not loaded) -> dict of tensors`; default from the
    config, `cfg.mode` and `second_view` (adds "image_tok": BEiT's tokenizer view). `masks` (a mask source
    that needs no scores) adds "mask" [B, N] and "ids_keep" [B, K] to every batch, drawn in the worker.
    In device mode call `loader.device_transform(batch)`: it lives on `device` (the engine's), copies the
    uint8 views there (non-blocking, from page-locked memory on a GPU) and returns floats of `dtype`; in
    decode_on_device mode it decodes the batch's JPEG bytes there first; in worker mode it passes batches
    through."""
    if masks is not None and masks.needs_scores:
        raise ValueError("this mask source needs the targets' scores: the trainer draws it, not the stream")
    return StreamLoader(cfg, transform, rank, world_size, masks, second_view, device, dtype)


# ----------------------------------------------------------------------------------------- skip metrics

# The metric-window keys of skips (every batch carries all of them, zeros included, so every rank
# all-reduces the same keys); a trainer passes them as `LoopConfig.totals` (summed over ranks, not averaged).
SKIP_TOTALS = ("skipped_samples",) + tuple(skip_key(r) for r in SKIP_REASONS)


def pop_skip_metrics(batch: dict) -> dict[str, int]:
    """Take the skip counts out of a batch as window metrics: the total and one count per reason."""
    total = int(batch.pop("skipped", 0))
    by = batch.pop("skipped_by", None)
    counts = by.tolist() if by is not None else [0] * len(SKIP_REASONS)
    return {"skipped_samples": total, **{skip_key(r): int(n) for r, n in zip(SKIP_REASONS, counts)}}


def skip_totals(stream: StreamLoader, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Collective: the skips of every rank since the run began (what the windows summed), for the closing
    record: {"skipped_samples_total": n, "skipped_total_by_reason": {reason: n}}."""
    import torch.distributed as dist

    counts = stream.skipped_by.to(device=device, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    by = {r: int(n) for r, n in zip(SKIP_REASONS, counts.tolist())}
    return {"skipped_samples_total": sum(by.values()), "skipped_total_by_reason": by}
