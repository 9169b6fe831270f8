"""Preemption: a signal sets a flag, every rank agrees on it at a step boundary, saves, and requeues.

Slurm warns a job before it ends it (``#SBATCH --signal=USR1@120``; submitit uses USR2), and sends
SIGTERM when it cancels or requeues it. Saving a DeepSpeed checkpoint is a collective: every rank
must call it at the same point of the loop. A signal arrives on each rank at a different moment (or
on one rank only), so the handler does nothing but set a flag, and :meth:`PreemptionFlag.should_stop`
all-reduces the flag at the end of a step: if any rank was signalled, every rank stops after the
same step. The trainer then saves on all ranks and exits with :data:`REQUEUE_EXIT_CODE`, which the
sbatch scripts turn into ``scontrol requeue $SLURM_JOB_ID``; the requeued job resumes from the
checkpoint, so at most the step in flight when the signal came is redone, none is lost.

The trainer's side::

    flag = PreemptionFlag().install()
    for step in range(start, total):
        train_step()
        if flag.should_stop():          # collective: every rank calls it every step
            save_checkpoint()           # all ranks
            sys.exit(REQUEUE_EXIT_CODE)
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Callable, Iterable

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry". No rank exits with
# it by accident (Python uses 1, signals give 128+n), so the sbatch script can requeue on it alone.
REQUEUE_EXIT_CODE = 75

# USR1: the sbatch scripts' warning signal. USR2: submitit's. TERM: Slurm's cancel / requeue / time
# limit, followed by SIGKILL after KillWait seconds: a step may still fit.
DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)

_active: "PreemptionFlag | None" = None
_pending_signal: int | None = None  # a request that came before any flag was installed


class PreemptionFlag:
    """A flag set by signals and agreed on by all ranks at step boundaries."""

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.signum: int | None = None  # the signal received on this rank, if any
        self.agreed = False  # True once should_stop() returned True: sticky
        self._previous: dict[int, Callable | int | None] = {}
        self._group = None  # process group for the flag's all-reduce (gloo, so no GPU sync)

    # -- local part: signal handlers -------------------------------------------------------------
    def install(self) -> "PreemptionFlag":
        """Install the handlers (main thread only) and become the flag that :func:`request_stop` sets."""
        global _active, _pending_signal
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionFlag.install() must run in the main thread (Python's signal rule)")
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        _active = self
        if _pending_signal is not None:
            self.request(_pending_signal)
            _pending_signal = None
        return self

    def uninstall(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        global _active
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        if _active is self:
            _active = None

    def __enter__(self) -> "PreemptionFlag":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Inside a signal handler: no collective, no I/O (a print racing the main thread's print
        # raises "reentrant call"). Only remember that it came.
        self.request(signum)

    def request(self, signum: int = signal.SIGUSR1) -> None:
        """Ask this rank to stop at the next step boundary (what the signal handler does)."""
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        """This rank was signalled (not yet agreed with the others)."""
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"

    # -- global part: agreement at a step boundary --------------------------------------------------
    def should_stop(self) -> bool:
        """All-reduce (max) the flag over all ranks: True on every rank if any rank was signalled.

        A collective: every rank must call it at the same step. Without torch.distributed it is the
        local flag.
        """
        if self.agreed:
            return True
        local = self.requested
        stop = local
        if _distributed_ready():
            import torch
            import torch.distributed as dist

            group = self._flag_group()
            flag = torch.tensor([1 if local else 0], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
            stop = bool(flag.item())
        if stop:
            self.agreed = True
            source = f"{self.signal_name} on this rank" if local else "another rank"
            print(f"[preempt] stop requested ({source}): saving at this step boundary", file=sys.stderr, flush=True)
        return stop

    def _flag_group(self):
        """The flag's own CPU (gloo) group, whatever the world's backend: on NCCL a host tensor is refused
        and a device one would make the host wait for the GPU every step. Created on first use, which
        every rank reaches at the same step."""
        import torch.distributed as dist

        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        return self._group


def _distributed_ready() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def request_stop(signum: int = signal.SIGUSR1) -> None:
    """Set the installed flag from outside the loop (submitit's ``checkpoint()``); if none is installed
    yet, the next :meth:`PreemptionFlag.install` picks the request up."""
    global _pending_signal
    if _active is not None:
        _active.request(signum)
    else:
        _pending_signal = signum


def active_flag() -> PreemptionFlag | None:
    return _active
