"""The rank environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from Slurm or a launcher.

``torchrun`` and the ``deepspeed`` launcher export these variables for every process they start.
``srun`` does not: it exports ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and a compressed
node list (``gpu[01-04]``), and DeepSpeed reads none of them. :func:`init_rank_env` fills the torch
variables from Slurm's when a process is an ``srun`` task, and leaves a launcher's variables alone.

Run as a module it does the same and then executes a command, which is how the sbatch scripts start
each rank::

    srun python -m mimkit.distributed.env python pretrain --config ...
"""

from __future__ import annotations

import os
import re
import socket
import sys
from typing import Mapping, MutableMapping

RANK_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")

# Ports derived from the job id land in [PORT_BASE, PORT_BASE + PORT_SPAN): below Linux's ephemeral
# range (32768+), so an outgoing connection never holds the port, and two jobs sharing a node get
# different ports unless their ids are PORT_SPAN apart.
PORT_BASE = 20000
PORT_SPAN = 10000


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets: ``"a1,b[3-5]"`` -> ``["a1", "b[3-5]"]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {text!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in host list {text!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range_set(ranges: str) -> list[str]:
    """``"01-03,7"`` -> ``["01", "02", "03", "7"]``; a range keeps the zero padding of its start."""
    out = []
    for item in ranges.split(","):
        item = item.strip()
        if "-" in item:
            lo, hi = item.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"bad range {item!r} in host list")
            width = len(lo) if lo.startswith("0") else 0
            out += [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
        elif item.isdigit():
            out.append(item)
        else:
            raise ValueError(f"bad range item {item!r} in host list")
    return out


def _expand_host_pattern(pattern: str) -> list[str]:
    """One host pattern, possibly with several bracket groups: ``rack[1-2]-n[1-2]`` -> 4 names."""
    m = re.search(r"\[([^\[\]]*)\]", pattern)
    if m is None:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [head + mid + rest for mid in _expand_range_set(m.group(1)) for rest in _expand_host_pattern(tail)]


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand Slurm's compressed node list, in Slurm's order (rank 0 runs on the first host).

    >>> expand_hostlist("a1,b[3-5]")
    ['a1', 'b3', 'b4', 'b5']
    >>> expand_hostlist("gpu[01-02,10]")
    ['gpu01', 'gpu02', 'gpu10']
    """
    hosts = []
    for pattern in _split_top_level(hostlist):
        hosts += _expand_host_pattern(pattern)
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """Slurm's ``SLURM_TASKS_PER_NODE`` (``"4(x2),3"``) as one count per node (``[4, 4, 3]``)."""
    counts = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if m is None:
            raise ValueError(f"bad tasks-per-node spec {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def master_port_from_job_id(job_id: str | int) -> int:
    """A port every rank of a job computes alike, different for jobs sharing a node."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"  # array jobs: "123_4"
    return PORT_BASE + int(digits) % PORT_SPAN


def _first(environ: Mapping[str, str], *keys: str) -> str | None:
    for key in keys:
        if environ.get(key):
            return environ[key]
    return None


def is_srun_task(environ: Mapping[str, str]) -> bool:
    """True inside a task started by ``srun`` (a job step), not in the batch script or an salloc shell.

    The batch shell also carries ``SLURM_PROCID=0`` and the job's ``SLURM_NTASKS``; taking those for a
    rank would make a lone process wait forever for peers. Only a step has a numeric step id.
    """
    step = _first(environ, "SLURM_STEP_ID", "SLURM_STEPID")
    return step is not None and step.isdigit() and "SLURM_PROCID" in environ


def rank_env_from_slurm(environ: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables of one ``srun`` task, computed from its SLURM_* variables.

    Step variables win over job variables: ``srun -n 2`` inside a larger allocation starts 2 ranks.
    """
    world_size = _first(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    nodelist = _first(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    job_id = _first(environ, "SLURM_JOB_ID", "SLURM_JOBID")
    tasks_per_node = _first(environ, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    missing = [name for name, value in [("SLURM_PROCID", environ.get("SLURM_PROCID")),
                                        ("SLURM_NTASKS", world_size), ("SLURM_JOB_NODELIST", nodelist),
                                        ("SLURM_JOB_ID", job_id)] if value is None]
    if missing:
        raise KeyError(f"not a Slurm task: {', '.join(missing)} not set")
    hosts = expand_hostlist(nodelist)
    node_rank = int(environ.get("SLURM_NODEID", "0"))
    if tasks_per_node:
        per_node = expand_tasks_per_node(tasks_per_node)
        local_world = per_node[min(node_rank, len(per_node) - 1)]
    else:
        local_world = int(world_size) // max(len(hosts), 1)
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": world_size,
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(local_world),
        "NODE_RANK": str(node_rank),
        "MASTER_ADDR": hosts[0],
        "MASTER_PORT": str(master_port_from_job_id(job_id)),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_rank_env(environ: MutableMapping[str, str] | None = None) -> str:
    """Make the rank variables present in ``environ`` (default ``os.environ``); return their source.

    - ``"launcher"``: RANK and WORLD_SIZE are already set (torchrun, deepspeed, accelerate, or this
      module run by the sbatch script): nothing is changed.
    - ``"slurm"``: an ``srun`` task: the variables come from :func:`rank_env_from_slurm`. An explicit
      MASTER_ADDR / MASTER_PORT in the environment is kept (a user's override).
    - ``"single"``: a lone process: rank 0 of 1 on localhost with a free port, so that
      ``deepspeed.init_distributed`` does not go looking for MPI.
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return "launcher"
    if is_srun_task(environ):
        derived = rank_env_from_slurm(environ)
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            derived[key] = environ.get(key, derived[key])
        environ.update(derived)
        return "slurm"
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "NODE_RANK": "0",
                "MASTER_ADDR": "127.0.0.1"}
    for key, value in defaults.items():
        environ.setdefault(key, value)
    if "MASTER_PORT" not in environ:
        environ["MASTER_PORT"] = str(_free_port())
    return "single"


def main(argv: list[str] | None = None) -> int:
    """``python -m mimkit.distributed.env CMD ...``: fill the rank variables, then exec CMD."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--"]:
        argv = argv[1:]
    source = init_rank_env()
    if not argv:  # no command: print what a rank would get
        for key in RANK_KEYS:
            print(f"{key}={os.environ.get(key, '')}")
        print(f"# source: {source}")
        return 0
    os.execvp(argv[0], argv)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
