"""User errors: what a person must fix (a bad value, a missing path, empty data, a refused file), as one
line instead of a traceback per rank.

Code that finds such a problem raises :class:`UserError` (or a subclass; :class:`BadValue` and
:class:`MissingPath` keep the built-in type a caller may already catch) with a message naming the key, the
value and what was expected. Every entry point (the three stages, the ``mimkit`` subcommands) runs its body
through :func:`run_main`, the one place that turns it into that line:

- rank 0 prints ``PROG: MESSAGE`` once and exits :data:`USER_ERROR_EXIT_CODE`; the launcher
  (torchrun, deepspeed, accelerate) passes a non-zero exit on and ends the other ranks;
- another rank exits with the same code without printing: ranks read the same config and files, so rank 0
  has found the same problem. A problem only that rank sees (its own shard subset) would then go unsaid:
  it waits :data:`PEER_GRACE_S` first (``MIMKIT_PEER_GRACE_S`` sets it), in which the launcher ends it
  when rank 0 failed too, and otherwise prints the line itself, naming its rank;
- ``MIMKIT_DEBUG=1`` (or a stage's ``--debug``) lets the exception through: the traceback.

Anything else (a bug) still raises with its traceback.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Callable

USER_ERROR_EXIT_CODE = 2  # argparse's code for a usage error
PEER_GRACE_S = 10.0
GRACE_ENV = "MIMKIT_PEER_GRACE_S"
DEBUG_ENV = "MIMKIT_DEBUG"


class UserError(Exception):
    """A problem the user fixes; the message names the key, the value and what was expected."""


class BadValue(UserError, ValueError):
    """A value that cannot work (a ValueError to callers that catch those)."""


class MissingPath(UserError, FileNotFoundError):
    """A path a key names that is not there or is not what the key needs."""

    def __str__(self) -> str:  # OSError's str of a one-argument error is the argument
        return str(self.args[0]) if self.args else ""


def debug_requested() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def request_debug() -> None:
    """A stage's ``--debug``: tracebacks for user errors too (child processes inherit it)."""
    os.environ[DEBUG_ENV] = "1"


def process_rank() -> int:
    """This process's global rank from the launcher's variables (0 when there is none)."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def report(prog: str, err: UserError, rank: int | None = None, grace_s: float | None = None) -> None:
    """Print ``err`` once for the whole job: at once on rank 0; on another rank only if it is still alive
    after ``grace_s`` (rank 0 did not fail: the problem is this rank's own)."""
    rank = process_rank() if rank is None else rank
    grace_s = float(os.environ.get(GRACE_ENV, PEER_GRACE_S)) if grace_s is None else grace_s
    if rank != 0:
        sys.stdout.flush()
        if threading.current_thread() is threading.main_thread():  # a preemption handler must not keep it alive
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(grace_s)
        prog = f"{prog} (rank {rank})"
    print(f"{prog}: {err}", file=sys.stderr, flush=True)


def run_main(prog: str, body: Callable[[], int | None]) -> int:
    """``body()``'s exit code; a :class:`UserError` becomes one line and :data:`USER_ERROR_EXIT_CODE`.
    Known third-party noise is filtered first (:func:`mimkit.runlog.filter_known_noise`)."""
    from mimkit.runlog import filter_known_noise

    filter_known_noise()
    try:
        return int(body() or 0)
    except UserError as err:
        if debug_requested():
            raise
        report(prog, err)
        return USER_ERROR_EXIT_CODE
