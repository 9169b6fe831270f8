"""Launch a script on 2 CPU ranks with torchrun from a test: free port, timeout, output kept."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).parent / "dist_scripts"
TORCHRUN = Path(sys.executable).parent / "torchrun"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(script: str | os.PathLike, args: list[str] = (), nproc: int = 2) -> list[str]:
    return [str(TORCHRUN), "--nnodes", "1", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "--max_restarts", "0", str(script), *map(str, args)]


def dist_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def run_torchrun(script: str | os.PathLike, args: list[str] = (), nproc: int = 2, timeout: float = 300,
                 cwd: str | os.PathLike | None = None, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """Run to completion; on failure (or ``check`` and a non-zero exit) raise with the output's tail.
    ``cwd`` should not be the repository root (it would put ``./tokenizers`` on sys.path)."""
    proc = subprocess.run(torchrun_command(script, list(args), nproc), env=dist_env(**env), cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {Path(script).name} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc
