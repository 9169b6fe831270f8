"""The run folder and what is written into it: metrics.jsonl, TensorBoard events, a progress bar.

Only rank 0 writes; on other ranks every call is a no-op, so training code never branches on rank.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
import warnings
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


PROGRESS_ENV = "MIMKIT_PROGRESS"  # bar | lines | off; default: a bar on a terminal, lines in a log file


class LineProgress:
    """tqdm's interface (update, set_postfix, close) for a log file: one line at each quarter of the run
    and at its end, instead of a bar redrawn with carriage returns."""

    def __init__(self, total: int | None, desc: str, initial: int, marks: int = 4, enabled: bool = True):
        self.total, self.desc, self.n, self.enabled = total, desc, initial, enabled
        self.start, self.postfix, self.closed = time.time(), "", False
        self.marks = sorted({max(1, (total * k) // marks) for k in range(1, marks + 1)}) if total else []
        self.marks = [m for m in self.marks if m > initial]

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.marks and self.n >= self.marks[0]:
            while self.marks and self.n >= self.marks[0]:
                self.marks.pop(0)
            self._line()

    def _line(self) -> None:
        if not self.enabled:
            return
        elapsed = time.strftime("%M:%S", time.gmtime(time.time() - self.start))
        total = f"/{self.total}" if self.total else ""
        print(f"{self.desc}: {self.n}{total} {self.postfix} [{elapsed}]".replace("  ", " "), file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        """A line of its own (tqdm.write's place for messages between progress lines)."""
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.closed and self.n > 0 and (self.marks or not self.total):  # stopped early, or no total
            self._line()
        self.closed = True


def progress_mode() -> str:
    """bar | lines | off: ``MIMKIT_PROGRESS``, else a bar on a terminal and lines in a log file."""
    return os.environ.get(PROGRESS_ENV, "") or ("bar" if sys.stderr.isatty() else "lines")


def progress(total: int | None = None, desc: str = "", enabled: bool | None = None, unit: str = "it",
             initial: int = 0) -> tqdm | LineProgress:
    """Rank 0's progress: a tqdm bar on a terminal, a line at each quarter of the run in a log file
    (``MIMKIT_PROGRESS=bar|lines|off`` chooses); ``set_postfix`` carries loss and throughput."""
    enabled = is_rank0() if enabled is None else enabled
    mode = progress_mode()
    if mode != "bar":
        return LineProgress(total, desc, initial, enabled=enabled and mode != "off")
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=not enabled,
                dynamic_ncols=True, mininterval=1.0)


# ---- known third-party noise, filtered at the source ---------------------------------------------
# (logger, or "warnings", and a regular expression of the message): messages that say nothing a user can act on.
KNOWN_NOISE = (
    # DeepSpeed's ZeRO calls a torch collective torch has renamed: once per call, hundreds per run
    ("warnings", r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
    ("warnings", r"`torch\.distributed\.reduce_scatter_tensor` is deprecated"),
    # mimkit's optimizer (torch AdamW with its parameter groups) under ZeRO is deliberate
    ("DeepSpeed", r"You are using ZeRO with an untested optimizer"),
    ("DeepSpeed", r"Setting accelerator to CPU"),
    # DeepSpeed's op builder imports torch's extension helper, which looks for CUDA on a CPU machine
    ("torch.utils.cpp_extension", r"No CUDA runtime is found"),
)


class _DropMessages(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self.pattern = re.compile("|".join(patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def filter_known_noise() -> None:
    """Drop KNOWN_NOISE: warnings by message, library loggers by a filter on the logger itself (set before
    the library creates it: `logging.getLogger` returns the same object, filters included)."""
    by_logger: dict[str, list[str]] = {}
    for source, pattern in KNOWN_NOISE:
        if source == "warnings":
            warnings.filterwarnings("ignore", message=f".*{pattern}")
        else:
            by_logger.setdefault(source, []).append(pattern)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(patterns))
