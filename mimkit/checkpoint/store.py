"""Engine checkpoints in ``runs/NAME/checkpoints/``: collective save, atomic ``latest``, keep last K.

Layout::

    checkpoints/step_00000100/   DeepSpeed's files (every rank writes its ZeRO partition)
    checkpoints/step_00000100/complete.json   written by rank 0 once every rank has finished
    checkpoints/latest           the tag of the newest complete checkpoint (tmp file + os.replace)

A checkpoint without ``complete.json`` is half-written (a rank died during the save): ``latest`` never
points at one, and loading one is refused. The client state holds what the run needs to continue the
same stream: step, samples seen, config, and one entry per rank (its data-stream position, its RNG).

The pieces any checkpoint layout needs alike (the ``latest`` pointer published after every rank has
written, the ``resume`` search, the RNG state) are plain functions, so fine-tuning's own layout uses the
same code: :func:`publish_latest`, :func:`latest_tag`, :func:`resolve_resume`, :func:`rng_state`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from mimkit.checkpoint.export_format import write_atomic

LATEST = "latest"
COMPLETE = "complete.json"
_TAG = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, half-written, or saved by a different world size."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _gather(obj: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
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
    """A run's ``resume`` setting -> the checkpoint folder to load: ``"none"`` -> None; ``"auto"`` -> the one
    ``latest`` in ``directory`` names (None before the first save); a path -> that folder, refused unless
    it holds ``required``."""
    if resume == "none":
        return None
    if resume == "auto":
        tag = latest_tag(directory, required)
        return None if tag is None else Path(directory) / tag
    path = Path(resume)
    if not (path / required).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {required}): refusing to load it")
    return path


def publish_latest(directory: str | os.PathLike, tag: str, complete: dict[str, Any] | None = None,
                   prune: Callable[[str], None] | None = None) -> None:
    """Collective, after each rank has written its part of ``tag``: once all have, rank 0 writes
    ``complete`` (when given) as the tag's completion marker, points ``latest`` at the tag (tmp file +
    os.replace, so it never names a half-written save) and then runs ``prune(tag)``; no rank returns
    before that is done (none races into the next save while rank 0 deletes)."""
    directory = Path(directory)
    _barrier()
    if _rank() == 0:
        if complete is not None:
            write_atomic(directory / tag / COMPLETE, json.dumps(complete))
        write_atomic(directory / LATEST, tag)
        if prune is not None:
            prune(tag)
    _barrier()


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
        """``"none"`` -> None; ``"auto"`` -> the latest complete checkpoint (None if none yet); a path to
        a tag folder -> that checkpoint, refused when half-written."""
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
        publish_latest(self.dir, tag, {"step": step, "world_size": engine.world_size}, self._prune)
        return tag

    def _prune(self, newest: str) -> None:
        """Keep the last ``keep`` complete checkpoints; drop half-written ones older than the newest."""
        complete = self.complete_tags()
        for tag in complete[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(self.dir / tag, ignore_errors=True)
        for p in self.dir.iterdir():
            if p.is_dir() and _TAG.match(p.name) and not self.is_complete(p.name) and p.name < newest:
                shutil.rmtree(p, ignore_errors=True)

    # -- loading -------------------------------------------------------------------------------------
    def load(self, engine, resume: str) -> tuple[dict[str, Any], Any] | None:
        """Load into ``engine`` (collective). Returns (client state, this rank's ``rank_state``) or
        None when there is nothing to resume from. Restores this rank's RNG."""
        found = self.resolve(resume)
        if found is None:
            return None
        load_dir, tag = found
        path, state = engine.ds.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if path is None or state is None:
            raise CheckpointError(f"DeepSpeed could not load {load_dir / tag}")
        if state.get("world_size") != engine.world_size:
            raise CheckpointError(
                f"{load_dir / tag} was saved by {state.get('world_size')} ranks, this run has "
                f"{engine.world_size}: convert it with DeepSpeed's universal checkpoint (ds_to_universal)")
        engine.load_state_dict(state.get("engine", {}))
        mine = state["ranks"][engine.rank]
        set_rng_state(mine["rng"])
        return state, mine["user"]
