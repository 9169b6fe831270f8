"""Where shards are and how a shard's samples are read: the one reader of tar shards in mimkit.

A shard spec is a brace pattern over any of

* local files (`.tar`, `.tar.gz`, `.tgz`), folders (their shards), globs;
* `pipe:COMMAND`: the command's stdout is the tar stream (`pipe:aws s3 cp s3://b/t-{000..099}.tar -`);
  a command that exits non-zero is reported with its stderr and counted like a bad shard;
* fsspec URLs (`s3://`, `gs://`, `https://`, ...), read through fsspec with the protocol's package
  (`pip install mimkit[s3]`, `mimkit[gcs]`, `mimkit[http]`).

Several sources are joined by "::". Local uncompressed tars are read with seeks (fast-forward skims
headers only); everything else is read as a stream (`tarfile` mode "r|*": gzip is detected).

Sample conventions (webdataset's): the first dot of a member's basename splits key and extension;
the image is the first of `IMAGE_KEYS` present (extensions compare lower-cased); the label is `.cls`
holding an integer, or `.cls` / `.txt` holding a class name mapped through a classes file
(`classes.json` beside the shards, or `data.classes=`). Labels are parsed only by a stage that needs them.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import select
import signal
import subprocess
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from typing import Callable, Generator, Optional

from PIL import Image

from mimkit.data.transforms import to_rgb
from mimkit.errors import BadValue, MissingPath

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# What a corrupt image raises in PIL; anything else is a bug and propagates.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
# Every reason a sample or a shard is skipped, in a fixed order: counts travel as a vector of this
# length, so every rank all-reduces the same keys. Shard-level reasons count shards, the others samples.
SKIP_REASONS = ("missing image", "missing label", "bad label", "undecodable image", "truncated tar",
                "unreadable shard", "pipe failed")
SHARD_REASONS = ("truncated tar", "unreadable shard", "pipe failed")
READ_ERRORS = (OSError, EOFError, tarfile.TarError, ValueError, zlib.error)  # what a bad stream raises

OnSkip = Callable[[str, str], None]


def skip_key(reason: str) -> str:
    """The metrics key of a skip reason: "skipped/missing_image"."""
    return "skipped/" + reason.replace(" ", "_")


# ----------------------------------------------------------------------------------------- specs


def is_pipe(path: str) -> bool:
    return path.startswith("pipe:")


def is_url(path: str) -> bool:
    return "://" in path and not is_pipe(path)


def is_local_tar(path: str) -> bool:
    """Read with seeks (random access, header-only skimming): a local uncompressed tar."""
    return not (is_pipe(path) or is_url(path)) and not path.endswith((".gz", ".tgz"))


def filesystem(url: str):
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        return fsspec.filesystem(protocol)
    except ImportError as err:
        extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}.get(protocol)
        hint = f" (pip install 'mimkit[{extra}]')" if extra else ""
        raise ValueError(f"shards '{url}': fsspec cannot read {protocol}:// here: {err}{hint}") from None
    except ValueError as err:
        raise ValueError(f"shards '{url}': unknown protocol {protocol}://: {err}") from None


def _expand_url(pattern: str) -> list[str]:
    fs = filesystem(pattern)
    protocol = pattern.split("://", 1)[0]
    if any(c in pattern for c in "*?[") and protocol not in ("http", "https"):
        return sorted(f"{protocol}://{p}" for p in fs.glob(pattern) if p.endswith(SHARD_SUFFIXES))
    if pattern.endswith("/") and protocol not in ("http", "https"):
        return sorted(f"{protocol}://{p}" for p in fs.ls(pattern, detail=False) if p.endswith(SHARD_SUFFIXES))
    return [pattern]  # existence is checked when it is read (a missing object is an unreadable shard)


def expand_shards(spec: str, key: str = "data.shards") -> list[list[str]]:
    """"a-{000..009}.tar::dir/::pipe:cat b-{0..3}.tar::s3://bucket/c-{0..9}.tar.gz" -> one list of
    shards per "::" source. Local files must exist; pipes and URLs are checked when read. `key`: the
    config key that gave `spec`, for the messages."""
    from braceexpand import braceexpand

    sources = []
    for part in [p.strip() for p in spec.split("::") if p.strip()]:
        paths: list[str] = []
        if is_pipe(part):
            paths = [f"pipe:{command}" for command in braceexpand(part[len("pipe:"):])]
        else:
            for pattern in braceexpand(part):
                if is_url(pattern):
                    paths += _expand_url(pattern)
                elif os.path.isdir(pattern):
                    paths += sorted(p for p in glob.glob(os.path.join(pattern, "*")) if p.endswith(SHARD_SUFFIXES))
                elif any(c in pattern for c in "*?["):
                    paths += sorted(glob.glob(pattern))
                else:
                    paths.append(pattern)
        missing = [p for p in paths if not (is_pipe(p) or is_url(p)) and not os.path.isfile(p)]
        if missing:
            raise MissingPath(f"{key}={part}: {len(missing)} shard(s) not found, e.g. {missing[0]}")
        if not paths:
            raise MissingPath(f"{key}={part}: no shards there (.tar / .tar.gz / .tgz files, a folder of "
                                    "them, a brace pattern, a glob, pipe:COMMAND or a URL)")
        sources.append(paths)
    if not sources:
        raise BadValue(f"{key} is empty: set it to the shards (a folder of .tar files, a brace pattern, pipe:, a URL)")
    return sources


def read_sizes(sources: list[list[str]]) -> Optional[int]:
    """Samples in all shards from the `sizes.json` files beside them ({shard basename: count}), or None
    when a shard has no entry (pipes never have one)."""
    total, manifests = 0, {}
    for path in (p for source in sources for p in source):
        if is_pipe(path):
            return None
        folder = beside(path, "")
        if folder not in manifests:
            manifests[folder] = _read_json(beside(path, "sizes.json")) or {}
        count = manifests[folder].get(path.rsplit("/", 1)[-1])
        if count is None:
            return None
        total += int(count)
    return total


def beside(shard: str, name: str) -> str:
    """The file `name` in the folder (or URL prefix) that holds `shard`."""
    if is_url(shard):
        return shard.rsplit("/", 1)[0] + "/" + name
    return os.path.join(os.path.dirname(shard), name)


def _read_json(path: str):
    try:
        if is_url(path):
            with filesystem(path).open(path, "rb") as f:
                return json.loads(f.read())
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------- labels


def load_classes(path: str) -> dict[str, int]:
    """A classes file -> {name: index}: a JSON list (index = position, as `mimkit shards` writes), a JSON
    object {name: index}, or text with one name per line."""
    if is_url(path):
        with filesystem(path).open(path, "rb") as f:
            text = f.read().decode()
    else:
        with open(path) as f:
            text = f.read()
    if path.endswith(".json"):
        data = json.loads(text)
        return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else \
            {str(name): i for i, name in enumerate(data)}
    return {name.strip(): i for i, name in enumerate(n for n in text.splitlines() if n.strip())}


def find_classes(sources: list[list[str]], classes: str = "") -> Optional[dict[str, int]]:
    """`classes` (a path or URL) when given, else `classes.json` beside the first shard of a source."""
    if classes:
        return load_classes(classes)
    for source in sources:
        first = source[0]
        if is_pipe(first):
            continue
        data = _read_json(beside(first, "classes.json"))
        if isinstance(data, list):
            return {str(name): i for i, name in enumerate(data)}
        if isinstance(data, dict):
            return {str(k): int(v) for k, v in data.items()}
    return None


class BadLabel(ValueError):
    pass


@dataclass
class LabelReader:
    """A sample's label: `.cls` as an integer, or `.cls` / `.txt` as a class name through `classes`.
    `.txt` counts only with a classes map (without one it is a caption, as img2dataset writes)."""

    classes: Optional[dict[str, int]] = None

    def keys(self) -> tuple[str, ...]:
        return ("cls", "txt") if self.classes else ("cls",)

    def __call__(self, data: dict[str, bytes]) -> Optional[int]:
        """None when the sample has no label; raises BadLabel when it has one that means nothing."""
        key = next((k for k in self.keys() if k in data), None)
        if key is None:
            return None
        try:
            text = data[key].decode().strip()
        except UnicodeDecodeError:
            raise BadLabel(f".{key} is not text") from None
        if self.classes and text in self.classes:
            return self.classes[text]
        if text.lstrip("-").isdigit() and key == "cls":
            return int(text)
        if self.classes:
            raise BadLabel(f".{key} '{text[:40]}' is not a class of the classes file")
        raise BadLabel(f".{key} '{text[:40]}' is not an integer (class names need a classes.json beside the "
                       "shards or data.classes=)")


def image_key(sample: dict) -> Optional[str]:
    return next((k for k in IMAGE_KEYS if k in sample), None)


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> 8-bit RGB (16-bit grey rescaled), fully decoded: the fine-tuning decode, the same pixels as
    the pretraining views read (`to_rgb`). Raises one of DECODE_ERRORS on a corrupt image."""
    return to_rgb(Image.open(io.BytesIO(data)))  # loaded in full: nothing left open (an in-memory file)


# ----------------------------------------------------------------------------------------- reading


@dataclass
class MemberRef:
    """Where a member's bytes are, when the reader only skims headers (fast-forward, indexing)."""

    path: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


def member_bytes(value: "bytes | MemberRef") -> bytes:
    """A sample field's bytes: read now when the reader only noted where they are (a `MemberRef`)."""
    return value.read() if isinstance(value, MemberRef) else value


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset convention: "dir/key.ext.more" -> ("dir/key", "ext.more"), extension lower-cased."""
    folder, base = os.path.split(name)
    key, dot, ext = base.partition(".")
    return (os.path.join(folder, key) if folder else key), (ext.lower() if dot else "")


# A shard reader yields samples {"__key__", "__shard__", ext: bytes | MemberRef} and returns the reason
# the shard failed (one of SHARD_REASONS, already reported through on_skip), or None when read whole.
ShardSamples = Generator[dict, None, Optional[str]]


def read_shard(path: str, load: Callable[[], bool], on_skip: OnSkip) -> ShardSamples:
    """Samples of one shard in member order; never raises for bad data (see `ShardSamples`). Members
    are only read into memory, never extracted (no member name reaches the file system).
    `load()` False: a local tar's members become MemberRefs (headers only); streams always load."""
    if is_local_tar(path):
        return (yield from _read_local(path, load, on_skip))
    return (yield from _read_stream(path, on_skip))


def _read_local(path: str, load: Callable[[], bool], on_skip: OnSkip) -> ShardSamples:
    """A member whose data runs past the end of the file (truncated tar) ends the shard and drops the
    sample being assembled; the check uses the header alone, so skimming and reading agree."""
    try:
        size = os.path.getsize(path)
        tar = tarfile.open(path, mode="r:")
    except (OSError, tarfile.TarError, EOFError) as err:
        on_skip("unreadable shard", f"{path}: {err}")
        return "unreadable shard"
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
                    return "truncated tar"
                if current is not None:
                    yield current
                return None
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
                    return "truncated tar"
            else:
                current[ext] = MemberRef(path, member.offset_data, member.size)


# A `pipe:` command that sends nothing for this long (stalled download) is killed and counted as failed.
PIPE_STALL_S = 300.0


class PipeSource:
    """`pipe:COMMAND`'s stdout as a file whose reads give up after `PIPE_STALL_S` without a byte
    (TimeoutError), so a stalled command never hangs the reader. stderr goes to a temporary file (a
    chatty command never blocks on a full pipe). The command runs in its own process group, killed as a
    whole when the reader stops early or gives up, and dies with this process (PR_SET_PDEATHSIG)."""

    def __init__(self, command: str, stall_s: Optional[float] = None):
        import functools

        from mimkit.distributed.lifetime import die_with_parent

        self.command, self.stall_s = command, PIPE_STALL_S if stall_s is None else stall_s
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self.stderr,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=functools.partial(die_with_parent, os.getpid()))
        self.fd = self.proc.stdout.fileno()

    def read(self, size: int = -1) -> bytes:
        """What the command has sent, at most `size` bytes (short reads, as a raw pipe; tarfile loops)."""
        if not select.select([self.fd], [], [], self.stall_s)[0]:
            raise TimeoutError(f"'{self.command}' sent nothing for {self.stall_s:g} s")
        return os.read(self.fd, 1 << 16 if size < 0 else min(size, 1 << 16))

    def finish(self) -> str:
        """After the tar (or a read error): read to EOF and wait, within `stall_s`; "" when the command
        exited 0, else its exit status (or that it was killed) and stderr's tail."""
        try:
            while self.read(1 << 16):
                pass
            code = self.proc.wait(timeout=self.stall_s)
        except (OSError, subprocess.TimeoutExpired) as err:
            self.kill()
            status = f"killed ({err})"
        else:
            if code == 0:
                return ""
            status = f"exited with status {code}"
        self.stderr.seek(0)
        tail = self.stderr.read()[-500:].decode(errors="replace").strip().replace("\n", " | ")
        return f"'{self.command}' {status}: {tail or '(no stderr)'}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def close(self) -> None:
        self.kill()  # still running: the reader stopped early (the epoch ended); no report
        self.proc.stdout.close()
        self.stderr.close()


def _read_stream(path: str, on_skip: OnSkip) -> ShardSamples:
    """A shard read front to back (pipe, URL, gzip). A stream that dies mid-way drops the sample being
    assembled; a pipe whose command failed is reported with its stderr instead of as a truncated tar."""
    pipe = None
    try:
        if is_pipe(path):
            pipe = PipeSource(path[len("pipe:"):])
            raw = pipe
        elif is_url(path):
            # http(s): a streaming read (servers need not support range requests); object stores: 8 MB blocks
            block = 0 if path.startswith(("http://", "https://")) else 8 << 20
            raw = filesystem(path).open(path, "rb", block_size=block)
        else:
            raw = open(path, "rb")
    except (OSError, ValueError) as err:
        on_skip("unreadable shard", f"{path}: {err}")
        return "unreadable shard"
    current: dict | None = None
    failure, detail = None, ""
    try:
        try:
            with tarfile.open(fileobj=raw, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = split_member_name(member.name)
                    f = tar.extractfile(member)
                    data = f.read() if f is not None else b""
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"member {member.name} is cut short")
                    if current is not None and current["__key__"] != key:
                        yield current
                        current = None
                    if current is None:
                        current = {"__key__": key, "__shard__": path}
                    current[ext] = data
        except READ_ERRORS as err:
            failure, detail = ("unreadable shard" if current is None else "truncated tar"), f"{path}: {err}"
            if isinstance(err, TimeoutError) and pipe is not None:  # stalled: no second wait in finish()
                pipe.kill()
        error = pipe.finish() if pipe is not None else ""
        if failure is None and current is not None:  # the tar ended cleanly: its last sample is whole
            yield current
        if error:  # counted even after a whole tar: the command did not end well
            failure, detail = "pipe failed", error + (f" [{detail}]" if detail else "")
        if failure is not None:
            on_skip(failure, detail)
        return failure
    finally:  # also when the reader stops early (GeneratorExit): a running command is killed
        if pipe is not None:
            pipe.close()
        else:
            raw.close()


class Spool:
    """Bytes kept in one local temporary file and read back by MemberRef: random access into streamed
    shards (pipe, URL, gzip) without holding them in memory. Removed by the process that made it, at exit
    or when the owner is collected (forked DataLoader workers read it, never remove it)."""

    def __init__(self, folder: Optional[str] = None):
        import weakref

        handle = tempfile.NamedTemporaryFile(prefix="mimkit-spool-", suffix=".bin", dir=folder, delete=False)
        self.path, self._file = handle.name, handle
        weakref.finalize(self, _remove_if_mine, self.path, os.getpid())

    def keep(self, data: bytes) -> MemberRef:
        offset = self._file.tell()
        self._file.write(data)
        return MemberRef(self.path, offset, len(data))

    def close(self) -> None:
        self._file.close()

    def __getstate__(self):
        return {"path": self.path, "_file": None}


class MemberReader:
    """Reads MemberRefs through handles kept open per process (they do not travel to DataLoader workers)."""

    def __init__(self):
        self._files: dict[str, object] = {}

    def __call__(self, ref: MemberRef) -> bytes:
        f = self._files.get(ref.path)
        if f is None:
            f = self._files[ref.path] = open(ref.path, "rb")
        f.seek(ref.offset)
        return f.read(ref.size)

    def __getstate__(self):
        return {"_files": {}}


@dataclass
class ShardIndex:
    """Random access to tar shards, built in one pass through `read_shard`: `kept[i]` is what `keep`
    kept of sample i, each member a `MemberRef` (local tars by their headers alone; members of streamed
    shards are written once to a local `Spool`, which lives as long as the index)."""

    shards: list[str]
    kept: list[dict]
    spool: Optional[Spool]


def index_shards(spec: str, key: str, keep: Callable[[dict, str], Optional[dict]], on_skip: OnSkip) -> ShardIndex:
    """`keep(sample, name)` gets each sample as `read_shard` gives it and returns the fields to keep
    (member values: bytes or MemberRef; anything else is kept as is), or None to drop it (after calling
    `on_skip` with the reason, if it is one). Failed and truncated shards are reported through `on_skip`."""
    shards = [p for source in expand_shards(spec, key) for p in source]
    kept, spool = [], None
    for path in shards:
        local = is_local_tar(path)
        if not local and spool is None:
            spool = Spool()
        for raw in read_shard(path, lambda: not local, on_skip):
            fields = keep(raw, f"{path}:{raw['__key__']}")
            if fields is not None:
                kept.append({k: spool.keep(v) if isinstance(v, bytes) else v for k, v in fields.items()})
    if spool is not None:
        spool.close()
    return ShardIndex(shards, kept, spool)


def _remove_if_mine(path: str, pid: int) -> None:
    if os.getpid() == pid:
        with contextlib.suppress(OSError):
            os.unlink(path)
