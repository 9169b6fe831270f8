"""The run folder and what is written into it: metrics.jsonl, TensorBoard events, a progress bar.

Only rank 0 writes; on other ranks every call is a no-op, so training code never branches on rank.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def make_run_dir(root: str | os.PathLike, name: str) -> Path:
    """``root/name`` with the standard sub-folders (checkpoints, export, pictures)."""
    path = Path(root) / name
    for sub in ("checkpoints", "export", "pictures"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):  # tensors and numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan / inf
    return value


class MetricsLogger:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool | None = None, tensorboard: bool = True):
        self.enabled = is_rank0() if enabled is None else enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, **metrics: Any) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress(total: int | None = None, desc: str = "", enabled: bool | None = None, unit: str = "it",
             initial: int = 0) -> tqdm:
    """A tqdm bar on rank 0 only; ``set_postfix`` carries loss and throughput."""
    enabled = is_rank0() if enabled is None else enabled
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=not enabled,
                dynamic_ncols=True, mininterval=1.0)
