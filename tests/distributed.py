"""Launch a script on 2 CPU ranks with torchrun from a test: free port, timeout, output kept; a
tampered checkpoint file, as a hostile shared filesystem would hand one over; and a tar of chosen
members (corrupt ones included), as a broken shard writer would leave one."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
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
    # Its own session: on a timeout the whole group goes (torchrun and its ranks, which a rank waiting in a
    # collective on a dead peer would otherwise outlive, holding a core).
    with subprocess.Popen(torchrun_command(script, list(args), nproc), env=dist_env(**env), cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True) as p:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
            raise AssertionError(f"torchrun {Path(script).name} ran past {timeout} s:\n{out[-6000:]}") from None
    proc = subprocess.CompletedProcess(p.args, p.returncode, out)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {Path(script).name} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc


class _Payload:
    """Unpickling it runs `touch MARKER`: the code a tampered checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def inject_payload(path: Path, marker: Path) -> None:
    """Add a payload to a checkpoint file (ours: read it trusting it) and, as a tamperer would, put the
    new size and hash in the record, so only the unpickler can stop it."""
    import torch

    from mimkit.checkpoint.safe_load import file_digest

    state = torch.load(path, map_location="cpu", weights_only=False)
    state["evil"] = _Payload(marker)
    torch.save(state, path)
    record_path = path.parent / "complete.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if "files" in record:
        record["files"][path.name] = file_digest(path)
        record_path.write_text(json.dumps(record))


def write_tar(path: str | os.PathLike, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A tar holding KEY.EXT members with exactly the bytes given, in order."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
