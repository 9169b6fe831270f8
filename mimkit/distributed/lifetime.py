"""Helper processes of a run that die with the process that started them (Linux).

Why: a rank killed with SIGKILL runs no cleanup, and no launcher signals its children: torchrun
``killpg``s only the ranks still alive, DeepSpeed's launcher walks only their process trees, and
Slurm's ``proctrack/linuxproc`` loses a process once it is reparented to init. A DataLoader worker of
the dead rank then lives on until PyTorch's own watchdog polls ``getppid()`` (every 5 s; forever when
the parent died before the worker read its parent pid), and while it lives it holds the dead rank's
inherited sockets open, so the surviving ranks see no closed connection and wait in their collective.
``PR_SET_PDEATHSIG`` makes the kernel kill the child the moment its parent dies.

    DataLoader(..., worker_init_fn=worker_init_dies_with_parent())
    subprocess.Popen(cmd, preexec_fn=functools.partial(die_with_parent, os.getpid()))

The signal follows the death of the parent *thread* that forked the child: start workers from a
thread that lives as long as they should (the training thread).
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from typing import Callable

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@functools.lru_cache(maxsize=1)
def _prctl() -> Callable[..., int] | None:
    """libc's prctl, resolved once in the parent so a forked child (``preexec_fn``) loads nothing."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # a libc without prctl (musl builds have it; be safe)
        return None


def die_with_parent(parent_pid: int, signum: int = signal.SIGKILL) -> bool:
    """Have the kernel send ``signum`` to this process when its parent dies. If the parent is no longer
    ``parent_pid`` (it died before this call), no signal would ever come: take it now. Returns False
    where the platform has no such request (not Linux), True otherwise."""
    prctl = _prctl()
    if prctl is None:
        return False
    if prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signum)
    return True


def _worker_dies_with(parent_pid: int, worker_id: int) -> None:
    die_with_parent(parent_pid)


def worker_init_dies_with_parent() -> Callable[[int], None]:
    """A DataLoader ``worker_init_fn`` (picklable, for spawn too): each worker is SIGKILLed when the
    process creating the loader now dies. Call it in that process, when building the loader."""
    _prctl()  # resolve before fork
    return functools.partial(_worker_dies_with, os.getpid())
