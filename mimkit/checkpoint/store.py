"""Engine checkpoints in ``runs/NAME/checkpoints/``: collective save, atomic ``latest``, keep last K.

Layout::

    checkpoints/step_00000100/   DeepSpeed's files (every rank writes its ZeRO partition)
    checkpoints/step_00000100/complete.json   written by rank 0 once every rank has finished
    checkpoints/latest           the tag of the newest complete checkpoint (tmp file + os.replace)

A checkpoint without ``complete.json`` is half-written (a rank died during the save): ``latest`` never
points at one, and loading one is refused. ``complete.json`` also records the size and SHA-256 of every
file of the checkpoint (each rank syncs and hashes the files it wrote; rank 0 writes the record after
all have). The client state holds what the run needs to continue the same stream: step, samples seen,
config, and one entry per rank (its data-stream position, its RNG).

Resuming trusts no file: :func:`choose_checkpoint` (collective) checks the recorded sizes and scans
every pickle before anything is loaded, checks the recorded hashes while DeepSpeed reads the files (a
thread per rank on its share: one read of the disk, hashing beside the load), and falls back from a
damaged ``latest`` to the newest checkpoint that verifies (``resume=strict``: stops instead); DeepSpeed
reads every file through the allow-listed unpickler of :mod:`mimkit.checkpoint.safe_load`, so a file
carrying code is refused, never run.

Another world size or ZeRO stage: rank 0 converts the chosen checkpoint once with DeepSpeed's
``ds_to_universal`` into ``checkpoints/universal/step_N/`` (atomically, recorded and verified like a save,
reused), and every rank loads it with DeepSpeed's universal loading, every file read through the allow-list.

The pieces any checkpoint layout needs alike (the ``latest`` pointer published after every rank has
written, the ``resume`` search, the RNG state) are plain functions, so fine-tuning's own layout uses the
same code: :func:`publish_latest`, :func:`latest_tag`, :func:`resolve_resume`, :func:`rng_state`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from mimkit.checkpoint.export_format import write_atomic
from mimkit.checkpoint.safe_load import (CheckpointError, UnsafeCheckpointFile, every_torch_load_tensors_only,
                                         file_digest, hash_mismatch, inspect_file, load_tensors_only)

LATEST = "latest"
COMPLETE = "complete.json"
UNIVERSAL = "universal"  # checkpoints/universal/step_X: DeepSpeed's universal form of checkpoints/step_X
RESUME_MODES = ("auto", "strict", "none")  # or a checkpoint folder
_TAG = re.compile(r"^step_(\d{8})$")
_ZERO_RANK = re.compile(r"zero_pp_rank_(\d+)_")


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files no longer match the sizes and hashes its completion record holds."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank: decisions read from disk once, so all ranks act on the same one."""
    if _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _say(message: str) -> None:
    if _rank() == 0:
        print(f"[checkpoint] {message}", file=sys.stderr, flush=True)


def _gather(obj: Any) -> list[Any]:
    if _world() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch, CUDA) as tensors and plain containers only, so
    they load back with ``torch.load(weights_only=True)``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`rng_state` saved."""
    if "python" in state:
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
    if "numpy" in state:
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_tag(directory: str | os.PathLike, required: str = COMPLETE) -> str | None:
    """The tag the ``latest`` pointer in ``directory`` names, or None before the first save. ``required`` is
    the file only a finished save writes: a pointer to a folder without it is an error naming both."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (pointer.parent / tag / required).is_file():
        raise CheckpointError(f"{pointer} names {tag}, which is not a complete checkpoint (no {required})")
    return tag


def resolve_resume(resume: str, directory: str | os.PathLike, required: str = COMPLETE) -> Path | None:
    """A run's ``resume`` setting -> the checkpoint folder to load, unverified: ``"none"`` -> None; ``"auto"``
    or ``"strict"`` -> the one ``latest`` in ``directory`` names (None before the first save); a path -> that folder, refused unless
    it holds ``required``."""
    if resume == "none":
        return None
    if resume in ("auto", "strict"):
        tag = latest_tag(directory, required)
        return None if tag is None else Path(directory) / tag
    path = Path(resume)
    if not (path / required).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {required}): refusing to load it")
    return path


def publish_latest(directory: str | os.PathLike, tag: str, complete: dict[str, Any] | None = None,
                   prune: Callable[[str], None] | None = None, written: list[Path] = ()) -> None:
    """Collective, after each rank has written its part of ``tag``: each rank syncs and hashes the files
    it ``written``; once all have, rank 0 writes ``complete`` (when given) plus ``files`` (name -> size
    and SHA-256 of every file of the tag; any file no rank named is hashed by rank 0) as the tag's
    completion record, points ``latest`` at the tag (tmp file + os.replace, so it never names a
    half-written save) and then runs ``prune(tag)``; no rank returns before that is done (none races into
    the next save while rank 0 deletes)."""
    directory = Path(directory)
    # A collective: once it returns, every rank has synced and hashed its files (no barrier needed).
    digests = _gather({Path(p).name: file_digest(p, sync=True) for p in written})
    if _rank() == 0:
        if complete is not None:
            files = {name: d for mine in digests for name, d in mine.items()}
            for path in sorted((directory / tag).iterdir()):
                if path.is_file() and path.name not in files and path.name != COMPLETE and path.suffix != ".tmp":
                    files[path.name] = file_digest(path, sync=True)
            write_atomic(directory / tag / COMPLETE, json.dumps(dict(complete, files=dict(sorted(files.items())))))
        write_atomic(directory / LATEST, tag)
        if prune is not None:
            prune(tag)
    _barrier()


def _record_of(tag_dir: Path) -> dict[str, Any] | None:
    """The completion record, or None where there is none (a fine-tuning checkpoint from before records)."""
    path = tag_dir / COMPLETE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return {"unreadable": f"{path}: unreadable ({err})"}


def _is_pickle(name: str) -> bool:
    return name.endswith(".pt")  # DeepSpeed's files, fine-tuning's optimizer and RNG states


def _share(files: dict[str, Any], tag_dir: Path, part: tuple[int, int]) -> list[str]:
    """The names rank ``part[0]`` of ``part[1]`` reads: a ZeRO partition its own rank (the one that loads
    it: its bytes come from the page cache that load fills), then the other files largest first, each to
    the rank with the fewest bytes so far (by index, rank 0 of a ViT-B/16 ZeRO-2 pair read 817 MB and
    rank 1 490 MB). The same answer on every rank: sizes come from the record where it has them."""
    def size(name: str) -> int:
        if files[name] is not None:
            return int(files[name]["size"])
        return (tag_dir / name).stat().st_size if (tag_dir / name).is_file() else 0

    owner = {name: int(m.group(1)) for name in files if (m := _ZERO_RANK.search(name)) and int(m.group(1)) < part[1]}
    loads = [0] * part[1]
    for name, rank in owner.items():
        loads[rank] += size(name)
    for name in sorted(set(files) - set(owner), key=lambda n: (-size(n), n)):
        owner[name] = loads.index(min(loads))
        loads[owner[name]] += size(name)
    return sorted(name for name, rank in owner.items() if rank == part[0])


def _recorded_files(tag_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(name -> recorded size and SHA-256, or None per file where the record holds no hashes; the line
    naming an unreadable record)."""
    record = _record_of(tag_dir)
    if record is not None and "unreadable" in record:
        return None, record["unreadable"]
    files = (record or {}).get("files")
    if files is None:
        files = {p.name: None for p in tag_dir.iterdir() if p.is_file() and p.name != COMPLETE}
    return files, None


def inspect_checkpoint(tag_dir: Path, part: tuple[int, int] = (0, 1), unpickle: bool = True,
                       hashes: bool = True) -> dict[str, Any]:
    """What is wrong with the files of ``tag_dir``: ``damaged`` (not the size or SHA-256 its record holds;
    without ``hashes`` the sizes only) and ``code`` (a pickle the allow-listed unpickler refuses; with
    ``unpickle``), one line per file; ``hashed``: whether the record holds hashes (not in checkpoints saved
    before they were recorded: then every file of the folder is inspected for code alone). ``part=(i, n)``:
    this rank's share of the files (:func:`_share`), so n ranks share the reading."""
    files, unreadable = _recorded_files(tag_dir)
    if unreadable:
        return {"hashed": True, "damaged": [unreadable], "code": []}
    found: dict[str, Any] = {"hashed": all(rec is not None for rec in files.values()), "damaged": [], "code": []}
    for name in _share(files, tag_dir, part):
        damage, code = inspect_file(tag_dir / name, files[name], unpickle and _is_pickle(name), check_hash=hashes)
        found["damaged"] += [damage] if damage else []
        found["code"] += [code] if code else []
    return found


def verify_checkpoint(tag_dir: Path, hashes: bool = True) -> dict[str, Any]:
    """Collective :func:`inspect_checkpoint`: each rank reads its share of the files; every rank gets the
    whole answer."""
    return _merge(_gather(inspect_checkpoint(tag_dir, (_rank(), _world()), hashes=hashes)))


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"hashed": all(p["hashed"] for p in parts), "damaged": [d for p in parts for d in p["damaged"]],
            "code": [c for p in parts for c in p["code"]]}


class _HashesWhileLoading:
    """Checks this rank's share of a checkpoint's recorded SHA-256s in a thread while the caller loads the
    checkpoint: the disk is read once (the page cache serves whichever reader comes second), and hashing
    (hashlib drops the GIL) overlaps the load instead of preceding it. :meth:`problems` (collective) joins
    and returns every rank's mismatches."""

    def __init__(self, tag_dir: Path):
        files, _ = _recorded_files(tag_dir)
        names = [n for n in _share(files or {}, tag_dir, (_rank(), _world())) if files[n] is not None]
        self._found: list[str] = []
        self._thread = threading.Thread(target=self._check, args=(tag_dir, files, names), daemon=True)
        self._thread.start()

    def _check(self, tag_dir: Path, files: dict[str, Any], names: list[str]) -> None:
        for name in names:
            try:
                damage = hash_mismatch(tag_dir / name, files[name])
            except OSError as err:
                damage = f"{tag_dir / name}: unreadable ({err})"
            self._found += [damage] if damage else []

    def problems(self) -> list[str]:
        self._thread.join()
        return [d for mine in _gather(self._found) for d in mine]


def summarize_problems(problems: list[str]) -> str:
    return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


def _resume_candidates(resume: str, directory: Path, required: str) -> list[dict[str, Any]]:
    """Rank 0: the checkpoints ``resume`` may load, in order of preference, each with a problem already
    known (not complete) or None. ``auto`` / ``strict``: ``latest``, then the other complete ones,
    newest first; a path: that one alone."""
    if resume not in ("auto", "strict"):
        try:
            return [{"path": str(resolve_resume(resume, directory, required)), "problem": None}]
        except CheckpointError as err:
            return [{"path": resume, "problem": str(err)}]
    pointer = directory / LATEST
    if not pointer.is_file():
        return []
    named = pointer.read_text().strip()
    first = {"path": str(directory / named), "problem": None}
    try:
        latest_tag(directory, required)
    except CheckpointError as err:
        first["problem"] = str(err)
    others = []
    for path in directory.iterdir():
        if path.is_dir() and path.name != named and (path / required).is_file():
            try:
                step = int(json.loads((path / required).read_text())["step"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            others.append((step, path.name))
    return [first] + [{"path": str(directory / name), "problem": None} for _, name in sorted(others, reverse=True)]


def choose_checkpoint(resume: str, directory: str | os.PathLike, required: str = COMPLETE,
                      load: Callable[[Path], Any] | None = None) -> Path | None:
    """Collective: the checkpoint folder a run with this ``resume`` setting loads, verified against its
    record and scanned for code, the same on every rank. ``none`` -> None; ``auto`` -> ``latest``, or when
    its files do not match their record (or it is half-written), the newest checkpoint that verifies,
    said on rank 0; ``strict`` and a path -> that checkpoint or :class:`DamagedCheckpoint` naming the
    file. A file carrying code stops the run in every mode (:class:`UnsafeCheckpointFile`): someone
    wrote it on purpose. A record without hashes (saved before they were recorded) loads with a warning.

    ``load(path)`` (collective; optional) loads a candidate: sizes and the code scan are checked before it
    runs, the hashes while it reads (one read of the disk, hashing beside the load, not before it); a
    checkpoint whose hashes then fail is refused like any other, and the next candidate is loaded over it.
    So a damaged file reaches the caller's state only between two loads, never past this function."""
    if resume == "none":
        return None
    directory = Path(directory)
    candidates = _from_rank0(_resume_candidates(resume, directory, required) if _rank() == 0 else None)
    refused = []
    for candidate in candidates:
        path = Path(candidate["path"])
        found = ({"hashed": True, "damaged": [candidate["problem"]], "code": []} if candidate["problem"]
                 else verify_checkpoint(path, hashes=load is None))
        if found["code"]:
            raise UnsafeCheckpointFile(f"run.resume={resume}: {summarize_problems(found['code'])}")
        if not found["damaged"] and load is not None:
            hashing = _HashesWhileLoading(path)
            load(path)
            found["damaged"] = hashing.problems()
        if found["damaged"]:
            if resume != "auto":
                raise DamagedCheckpoint(f"run.resume={resume}: {summarize_problems(found['damaged'])}")
            _say(f"refusing {path.name}: {summarize_problems(found['damaged'])}")
            refused.append(path)
            continue
        if not found["hashed"]:
            _say(f"{path} records no file hashes (saved before they were recorded): loading it unverified")
        if refused:
            _say(f"resuming from {path}, the newest checkpoint that verifies (refused: "
                 f"{', '.join(p.name for p in refused)})")
        return path
    if refused:
        raise DamagedCheckpoint(f"no checkpoint in {directory} verifies (refused: {', '.join(p.name for p in refused)})")
    return None


# -- another world size or ZeRO stage: DeepSpeed's universal checkpoint --------------------------------
def saved_layout(tag_dir: Path) -> tuple[int | None, str]:
    """(world size, partitioning) a DeepSpeed tag was saved with: its record's world size (None when it has
    none) and, from the file names DeepSpeed gives, ``"zero3"`` (a parameter partition per rank),
    ``"zero12"`` (an optimizer partition per rank: stages 1 and 2 share the layout) or ``"full"`` (stage 0)."""
    record = _record_of(tag_dir) or {}
    names = [p.name for p in tag_dir.iterdir()]
    if any(_ZERO_RANK.search(n) and n.endswith("_model_states.pt") for n in names):
        layout = "zero3"
    elif any(n.endswith("_optim_states.pt") for n in names):
        layout = "zero12"
    else:
        layout = "full"
    world = record.get("world_size")
    return (int(world) if world is not None else None), layout


def layout_of(world_size: int, zero_stage: int) -> tuple[int, str]:
    return world_size, {0: "full", 1: "zero12", 2: "zero12", 3: "zero3"}[zero_stage]


def needs_universal(saved: tuple[int | None, str], running: tuple[int, str]) -> bool:
    """Whether a checkpoint saved as ``saved`` must go through the universal form to load as ``running``.
    Stage 0 keeps every tensor on every rank, so it loads on any world size as it is; DeepSpeed's converter
    reads optimizer partitions, so a change between stage 0 and a ZeRO stage is refused (one line)."""
    (world, layout), (now_world, now_layout) = saved, running
    if layout == now_layout and (world in (None, now_world) or layout == "full"):
        return False
    if "full" in (layout, now_layout):
        raise CheckpointError(f"the checkpoint was saved with {world} rank(s) at {layout}, this run has {now_world} at "
                              f"{now_layout}: DeepSpeed's universal checkpoint converts between ZeRO stages 1-3 "
                              "(any world size) and stage 0 loads on any world size, but not between stage 0 and 1-3")
    return True


def convert_to_universal(tag_dir: Path, out: Path) -> None:
    """One process: DeepSpeed's ``ds_to_universal`` on ``tag_dir`` (already verified and scanned), into a
    temporary folder beside ``out`` then renamed, so ``out`` is whole or absent. Every file the converter
    reads, it reads through the allow-listed unpickler; the record written into the folder holds the size
    and SHA-256 of every file, as a save's does."""
    import argparse
    import io

    from deepspeed.checkpoint import ds_to_universal

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    chatter = io.StringIO()  # its progress bars and prints: shown only when it fails
    try:
        with every_torch_load_tensors_only(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"converting {tag_dir} to DeepSpeed's universal checkpoint failed: "
                              f"{type(err).__name__}: {err}\n{chatter.getvalue()[-2000:]}") from err
    (tmp.parent / "latest_universal").unlink(missing_ok=True)  # the converter's pointer; we name folders ourselves
    # DeepSpeed's universal loader reads the client state from the model-states file the *loading* stage names
    # (stages 1-2: mp_rank_00_..., stage 3: zero_pp_rank_0_mp_rank_00_...); the converter keeps the saving
    # stage's name only, so the folder gets both and loads at any stage.
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    have = [n for n in names if (tmp / n).is_file()]
    for name in names if have else ():
        if not (tmp / name).is_file():
            shutil.copyfile(tmp / have[0], tmp / name)
    _optimizer_state_for_every_stage(tmp / "zero" / "optimizer_state.pt")
    files = {str(p.relative_to(tmp)): file_digest(p, sync=True) for p in sorted(tmp.rglob("*")) if p.is_file()}
    record = dict(_record_of(tag_dir) or {}, source=tag_dir.name, format="deepspeed-universal", files=files)
    write_atomic(tmp / COMPLETE, json.dumps(record))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def _optimizer_state_for_every_stage(path: Path) -> None:
    """The converter writes ``zero/optimizer_state.pt`` in the saving stage's layout: from stages 1-2 without
    the ``optimizer_state_dict`` (its Adam step, its groups) that DeepSpeed's stage-3 universal loader reads
    (a KeyError there, DeepSpeed 0.19). Add what is missing, the step taken from the per-parameter
    ``step.pt`` the converter wrote (the same for every parameter)."""
    state = load_tensors_only(path)
    if "optimizer_state_dict" not in state:
        step = load_tensors_only(next(path.parent.glob("*/step.pt")))
        state["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": state["param_groups"]}
        torch.save(state, path)


def universal_checkpoint(tag_dir: Path) -> Path:
    """Collective: the universal form of the verified checkpoint ``tag_dir``, in ``checkpoints/universal/``:
    rank 0 converts it once (reused while it verifies; converted again when it does not), then every rank
    verifies it against its record and scans it for code, as a checkpoint before loading."""
    out = tag_dir.parent / UNIVERSAL / tag_dir.name
    for attempt in range(2):
        error = None
        if _rank() == 0 and (attempt or not (out / COMPLETE).is_file()):
            _say(f"converting {tag_dir.name} to DeepSpeed's universal checkpoint in {out}")
            try:
                convert_to_universal(tag_dir, out)
            except CheckpointError as err:
                error = str(err)
        error = _from_rank0(error)
        if error:
            raise CheckpointError(error)
        found = verify_checkpoint(out)
        if found["code"]:
            raise UnsafeCheckpointFile(summarize_problems(found["code"]))
        if not found["damaged"]:
            return out
        _say(f"refusing {out}: {summarize_problems(found['damaged'])}")
    raise DamagedCheckpoint(f"{out} does not verify after converting it again")


@contextlib.contextmanager
def _universal_loading(ds_engine):
    """DeepSpeed (0.19) reads its ``checkpoint.load_universal`` setting only when loading: on for one load,
    with every ``torch.load`` of the universal loader (it reads the ``zero/`` files itself) allow-listed."""
    config = ds_engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        with every_torch_load_tensors_only():
            yield
    finally:
        config.load_universal_checkpoint = before


def _load_buffers(module: torch.nn.Module, universal_dir: Path) -> None:
    """DeepSpeed's universal load restores parameters from ``zero/`` and skips the module state, buffers
    included (0.19): a codebook's EMA statistics, counters. They are not partitioned under any stage, so
    they come from the saved module state as they are."""
    saved = load_tensors_only(universal_dir / "mp_rank_00_model_states.pt")["module"]
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name in saved:
                buffer.copy_(saved[name])


def _reseed(rank: int, step: int) -> None:
    """Fresh RNG states on a new world size (the saved ones belong to other ranks): a function of the
    setup's per-rank seed (``torch.initial_seed``) and the step, so no two ranks and no two resumes agree."""
    from mimkit.data.stream import derive_seed

    seed = derive_seed(torch.initial_seed() >> 32, torch.initial_seed(), rank, step)  # every bit of the 64-bit seed
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _deepspeed_reads_tensors_only(ds_engine):
    """DeepSpeed (0.19) reads every checkpoint file through ``engine.checkpoint_engine.load``, which calls
    ``torch.load(weights_only=False)`` explicitly (so torch's ``safe_globals`` cannot reach it): for the
    length of one load, that reader is the allow-listed one."""
    reader = getattr(ds_engine, "checkpoint_engine", None)
    if reader is None or not callable(getattr(reader, "load", None)):
        raise CheckpointError(f"DeepSpeed {type(ds_engine).__name__} has no checkpoint_engine.load to read "
                              "checkpoints through: refusing to let it unpickle them")
    reader.load = lambda path, map_location=None: load_tensors_only(path, map_location)  # shadows the method
    try:
        yield
    finally:
        del reader.load


def _files_written_by(tag_dir: Path, rank: int) -> list[Path]:
    """The files of a DeepSpeed tag this rank wrote: its ZeRO partitions (``zero_pp_rank_R_``); rank 0
    also the unpartitioned ones (``mp_rank_00_model_states.pt``)."""
    out = []
    for path in sorted(tag_dir.iterdir()):
        m = _ZERO_RANK.search(path.name)
        if path.is_file() and path.name != COMPLETE and (int(m.group(1)) == rank if m else rank == 0):
            out.append(path)
    return out


class CheckpointStore:
    """Save / find / load engine checkpoints in one folder. ``save`` and ``load`` are collective."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        self.dir = Path(directory)
        self.keep = keep

    # -- finding -------------------------------------------------------------------------------------
    def is_complete(self, tag: str) -> bool:
        return (self.dir / tag / COMPLETE).is_file()

    def complete_tags(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        tags = [p.name for p in self.dir.iterdir() if p.is_dir() and _TAG.match(p.name)]
        return sorted(t for t in tags if self.is_complete(t))

    def latest(self) -> str | None:
        """The tag ``latest`` names, or None when nothing was saved yet."""
        return latest_tag(self.dir)

    def resolve(self, resume: str) -> tuple[Path, str] | None:
        """``"none"`` -> None; ``"auto"`` / ``"strict"`` -> the latest complete checkpoint (None if none
        yet); a path to a tag folder -> that checkpoint, refused when half-written. Not verified: loading
        goes through :func:`choose_checkpoint`."""
        path = resolve_resume(resume, self.dir)
        return None if path is None else (path.parent, path.name)

    # -- saving --------------------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict[str, Any], rank_state: Any = None) -> str:
        """Every rank calls this (DeepSpeed's save is collective). ``rank_state`` is gathered from all
        ranks and stored once; ``latest`` moves only after every rank has finished writing."""
        tag = tag_for(step)
        state = dict(client_state)
        state["step"] = step
        state["world_size"] = engine.world_size
        state["engine"] = engine.state_dict()
        state["ranks"] = _gather({"rng": rng_state(), "user": rank_state})
        self.dir.mkdir(parents=True, exist_ok=True)
        engine.ds.save_checkpoint(str(self.dir), tag=tag, client_state=state, save_latest=False)
        publish_latest(self.dir, tag, {"step": step, "world_size": engine.world_size,
                                       "zero_stage": engine.cfg.zero_stage}, self._prune,
                       written=_files_written_by(self.dir / tag, _rank()))
        return tag

    def _prune(self, newest: str) -> None:
        """Keep the last ``keep`` complete checkpoints; drop half-written ones older than the newest."""
        complete = self.complete_tags()
        for tag in complete[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(self.dir / tag, ignore_errors=True)
        for p in self.dir.iterdir():
            if p.is_dir() and _TAG.match(p.name) and not self.is_complete(p.name) and p.name < newest:
                shutil.rmtree(p, ignore_errors=True)
        converted = self.dir / UNIVERSAL
        for p in converted.iterdir() if converted.is_dir() else []:  # universal forms of pruned checkpoints
            if p.is_dir() and not (self.dir / p.name).is_dir():
                shutil.rmtree(p, ignore_errors=True)

    # -- loading -------------------------------------------------------------------------------------
    def load(self, engine, resume: str) -> tuple[dict[str, Any], Any] | None:
        """Load into ``engine`` (collective). Returns (client state, this rank's ``rank_state``) or
        None when there is nothing to resume from. Restores this rank's RNG. The checkpoint is
        :func:`choose_checkpoint`'s (verified, with fallback), read with code execution refused."""
        loaded: dict[str, Any] = {}

        def deepspeed_load(found: Path) -> None:
            saved = _from_rank0(saved_layout(found) if _rank() == 0 else None)
            universal = needs_universal(saved, layout_of(engine.world_size, engine.cfg.zero_stage))
            if universal:
                _say(f"{found.name} was saved by {saved[0]} rank(s) ({saved[1]}), this run has {engine.world_size} "
                     f"(ZeRO-{engine.cfg.zero_stage}): loading its universal form")
                found = universal_checkpoint(found)
            # the groups' own settings (lr_scale, wd_scale, betas: the run's config); DeepSpeed's stage-3
            # universal loader gives every group the first saved group's (0.19), so they are put back after it
            settings = [{k: v for k, v in g.items() if k != "params"} for g in engine.param_groups]
            with _deepspeed_reads_tensors_only(engine.ds), (
                    _universal_loading(engine.ds) if universal else contextlib.nullcontext()):
                path, loaded["state"] = engine.ds.load_checkpoint(str(found.parent), tag=found.name,
                                                                  load_optimizer_states=True,
                                                                  load_lr_scheduler_states=False)
            if path is None or loaded["state"] is None:
                raise CheckpointError(f"DeepSpeed could not load {found}")
            if universal:
                for group, own in zip(engine.param_groups, settings):
                    group.update(own)
                _load_buffers(engine.module, found)

        # the saved files are verified (sizes and the code scan before, hashes beside the load) whatever form
        # is loaded: a universal form is made from them and verified against its own record too
        if choose_checkpoint(resume, self.dir, load=deepspeed_load) is None:
            return None
        state = loaded["state"]
        engine.load_state_dict(state.get("engine", {}))
        if len(state["ranks"]) == engine.world_size:
            mine = state["ranks"][engine.rank]
            set_rng_state(mine["rng"])
            return state, mine["user"]
        # Another world size: the saved RNG states belong to other ranks, so each rank draws fresh ones;
        # rank 0's entry carries what every rank shares (the stream position is the same on every rank).
        _reseed(engine.rank, int(state["step"]))
        return state, state["ranks"][0]["user"]
