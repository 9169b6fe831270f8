"""``mimkit submit STAGE CONFIG [overrides] --nodes N --gpus-per-node G ...``: a stage through submitit.

submitit writes the sbatch script (or, with ``--executor local``, runs the tasks on this machine),
starts one task per rank and calls :class:`StageJob` in each. A task runs the stage as a child
process (``python pretrain --config ...``, what a user types) with the rank environment set, so a
stage needs nothing from submitit.

Preemption, the same path as ``sbatch slurm/pretrain.sh``: submitit asks Slurm for its warning
signal (USR2, ``--signal-delay`` seconds before the end). Slurm delivers it to every process of the
job, the stages' own :class:`~mimkit.distributed.preempt.PreemptionFlag` included: the ranks agree,
save at the step boundary and exit 75. submitit also calls :meth:`StageJob.checkpoint` on rank 0,
inside its signal handler. That method must not save (a DeepSpeed save is a collective of all ranks,
and the handler interrupts rank 0 alone): it only signals the child and waits for it to finish its
save, then returns the same job, which submitit requeues. The requeued job has the same id, so the
same run folder, and the stage resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mimkit.distributed.env import is_srun_task, master_port_from_job_id, rank_env_from_slurm
from mimkit.distributed.lifetime import die_with_parent
from mimkit.distributed.preempt import REQUEUE_EXIT_CODE

STAGES = ("pretrain", "tokenizers", "finetune")
SRUN_WAIT_S = 30  # srun ends the other tasks this long after the first one exits (slurm/common.sh)
SAVE_TIMEOUT_S = 600  # how long checkpoint() waits for the stage's save (Slurm's signal delay bounds it too)


def stage_folder(stage: str) -> str:
    """The stage's folder (``<repo>/pretrain``): ``python FOLDER`` runs its ``__main__.py``."""
    spec = importlib.util.find_spec(f"mimkit.{stage}")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"mimkit submit: stage package mimkit.{stage} is not installed")
    return list(spec.submodule_search_locations)[0]


def split_run_overrides(overrides: list[str], stage: str, job_id: str) -> tuple[str, str, list[str]]:
    """(run root, run name, other overrides); the name defaults to STAGE-JOBID, like the sbatch scripts."""
    root, name, rest = "runs", f"{stage}-{job_id}", []
    for item in overrides:
        if item.startswith("run.root="):
            root = item.split("=", 1)[1]
        elif item.startswith("run.name="):
            name = item.split("=", 1)[1]
        else:
            rest.append(item)
    return root, name, rest


def rank_env_from_submitit(job_env) -> dict[str, str]:
    """The rank variables of one submitit task: Slurm's derivation under srun, else submitit's own
    numbers (the local executor's tasks are processes on this machine)."""
    if is_srun_task(os.environ):
        return rank_env_from_slurm(os.environ)
    nodes = max(job_env.num_nodes, 1)
    hosts = list(job_env.hostnames) if nodes > 1 else ["127.0.0.1"]
    return {
        "RANK": str(job_env.global_rank), "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(job_env.local_rank), "LOCAL_WORLD_SIZE": str(job_env.num_tasks // nodes),
        "NODE_RANK": str(job_env.node), "MASTER_ADDR": hosts[0],
        "MASTER_PORT": str(master_port_from_job_id(job_env.raw_job_id)),
    }


def _wait(child: subprocess.Popen, timeout: float | None = None) -> int | None:
    # A poll loop, not Popen.wait(): wait() blocks holding a lock that checkpoint(), running in a
    # signal handler on this same thread, would then wait on forever.
    deadline = None if timeout is None else time.time() + timeout
    while (rc := child.poll()) is None:
        if deadline is not None and time.time() > deadline:
            return None
        time.sleep(0.2)
    return rc


class StageJob:
    """What every submitit task runs: the stage as a child process with its rank environment."""

    def __init__(self, stage: str, config: str, overrides: list[str], workdir: str,
                 stage_dir: str | None = None) -> None:
        self.stage, self.config, self.overrides, self.workdir = stage, config, list(overrides), workdir
        self.stage_dir = stage_dir  # None: the installed stage package's folder
        self._child: subprocess.Popen | None = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_child"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._child = None

    def command(self, job_id: str) -> tuple[list[str], Path]:
        root, name, rest = split_run_overrides(self.overrides, self.stage, job_id)
        cmd = [sys.executable, self.stage_dir or stage_folder(self.stage), "--config", self.config,
               f"run.root={root}", f"run.name={name}", *rest]
        return cmd, Path(root) / name

    def __call__(self) -> str:
        import submitit

        job_env = submitit.JobEnvironment()
        # submitit's handler for its signal: after our save it does the requeue (rank 0).
        submitit_signal = job_env._usr_sig()
        submitit_handler = signal.getsignal(submitit_signal)
        env = dict(os.environ, **rank_env_from_submitit(job_env))
        cmd, run_dir = self.command(job_env.job_id)
        print(f"[mimkit submit] {job_env}: {' '.join(cmd)}", flush=True)
        # the stage dies with this task: a task SIGKILLed (or ended by submitit's local controller)
        # must not leave its rank training on, orphaned
        self._child = subprocess.Popen(cmd, cwd=self.workdir, env=env,
                                       preexec_fn=functools.partial(die_with_parent, os.getpid()))
        rc = _wait(self._child)
        if rc == REQUEUE_EXIT_CODE:
            print(f"[mimkit submit] {self.stage} saved after a preemption signal: requeue", flush=True)
            if job_env.global_rank == 0 and callable(submitit_handler):
                submitit_handler(submitit_signal, None)  # checkpoint() -> requeue -> exit
            sys.exit(REQUEUE_EXIT_CODE)  # other ranks: no result file, the requeued job writes it
        if rc != 0:
            raise RuntimeError(f"{self.stage} exited with code {rc}; see the task logs")
        return str(Path(self.workdir) / run_dir)

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on rank 0 inside its signal handler. Only signals the stage (which
        saves on all ranks at its next step boundary), waits for that, and returns the job to requeue."""
        import submitit

        child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGUSR1)
            if _wait(child, SAVE_TIMEOUT_S) is None:
                print("[mimkit submit] the stage did not finish its save in time; requeueing anyway", flush=True)
        return submitit.helpers.DelayedSubmission(
            StageJob(self.stage, self.config, self.overrides, self.workdir, self.stage_dir))


def node_count(text: str) -> tuple[int, int]:
    """``--nodes``: ``N`` or ``MIN-MAX`` -> (min, max)."""
    low, _, high = text.partition("-")
    try:
        nodes = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {text!r}") from None
    if not 1 <= nodes[0] <= nodes[1]:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return nodes


def slurm_parameters(args: argparse.Namespace) -> dict:
    """submitit's parameters for ``args``. A node range goes to sbatch as ``--nodes=MIN-MAX`` (submitit
    takes a number: it counts MIN); ``srun`` in the job then starts the tasks of the nodes Slurm gave."""
    tasks = args.tasks_per_node or max(args.gpus_per_node, 1)
    extra = {"requeue": True}
    if args.nodes[0] != args.nodes[1]:
        extra["nodes"] = f"{args.nodes[0]}-{args.nodes[1]}"
    params = dict(nodes=args.nodes[0], tasks_per_node=tasks, gpus_per_node=args.gpus_per_node,
                  cpus_per_task=args.cpus_per_task, timeout_min=args.time, name=args.name or args.stage,
                  stderr_to_stdout=True, slurm_signal_delay_s=args.signal_delay, slurm_additional_parameters=extra,
                  # srun --wait: see slurm/common.sh (a crashed rank's peers are ended, not left to the timeout)
                  slurm_srun_args=[f"--wait={SRUN_WAIT_S}"])
    if args.partition:
        params["slurm_partition"] = args.partition
    return params


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mimkit submit", description="Submit a stage to Slurm (or run it on this "
                                "machine) through submitit, with preemption: save, requeue, resume.")
    p.add_argument("stage", choices=STAGES)
    p.add_argument("config", help="the stage's YAML config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides for the stage")
    p.add_argument("--nodes", type=node_count, default=(1, 1), metavar="N|MIN-MAX",
                   help="nodes (default 1); MIN-MAX lets Slurm start (and requeue) the job on any count in the "
                        "range, and the run resumes on the world size it gets")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--tasks-per-node", type=int, default=None, help="ranks per node (default: GPUs per node, at least 1)")
    p.add_argument("--cpus-per-task", type=int, default=10, help="CPUs per rank (default 10)")
    p.add_argument("--time", type=int, default=24 * 60, help="time limit in minutes (default 1440)")
    p.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
    p.add_argument("--signal-delay", type=int, default=120,
                   help="seconds between the warning signal and the end (default 120)")
    p.add_argument("--executor", choices=("auto", "slurm", "local"), default="auto",
                   help="auto (default): Slurm when srun is on PATH, else local")
    p.add_argument("--folder", default=None, help="submitit's logs and pickles (default RUN_ROOT/submitit/%%j)")
    p.add_argument("--name", default=None, help="Slurm job name (default: the stage)")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="submit without first checking the config here (the stage's --check)")
    return p


def stage_command(stage: str, *args: str) -> list[str]:
    return [sys.executable, stage_folder(stage), *args]


def stage_help(argv: list[str]) -> str:
    """`mimkit submit [STAGE] --help`: submit's options, then the stage's keys when one is named."""
    text = build_parser().format_help()
    stage = next((a for a in argv if a in STAGES), None)
    if stage is not None:
        out = subprocess.run(stage_command(stage, "--help"), capture_output=True, text=True)
        text += f"\n{stage}'s own options and config keys ({stage} --help):\n\n{out.stdout}"
    return text


def check_stage_config(stage: str, config: str, overrides: list[str]) -> str | None:
    """The stage's `--check` on this machine: None when the config is good, else what the stage said
    (one line naming the key), so a typo fails now and not after the job waited in the queue."""
    out = subprocess.run(stage_command(stage, "--config", config, *overrides, "--check"), capture_output=True,
                         text=True)
    return None if out.returncode == 0 else (out.stderr.strip() or out.stdout.strip() or f"exit {out.returncode}")


def main(argv: list[str] | None = None) -> int:
    import submitit

    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(stage_help(argv))
        return 0
    # intermixed: overrides may come before or after the options (`... c.yaml a=1 --nodes 2 b=2`)
    args = build_parser().parse_intermixed_args(argv)
    if args.check:
        problem = check_stage_config(args.stage, args.config, args.overrides)
        if problem is not None:
            print(f"mimkit submit: nothing submitted: {problem}", file=sys.stderr)
            return 2
    run_root, _, _ = split_run_overrides(args.overrides, args.stage, "")
    folder = args.folder or str(Path(run_root) / "submitit" / "%j")
    cluster = None if args.executor == "auto" else args.executor
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params = slurm_parameters(args)
    if executor.cluster != "slurm":  # the local executor: no Slurm options
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    executor.update_parameters(**params)
    job = executor.submit(StageJob(args.stage, args.config, args.overrides, os.getcwd()))
    _, run_name, _ = split_run_overrides(args.overrides, args.stage, job.job_id)
    print(f"job id:   {job.job_id} ({executor.cluster})")
    print(f"run:      {Path(run_root) / run_name}")
    print(f"stdout:   {job.paths.stdout}")
    print(f"stderr:   {job.paths.stderr}")
    if executor.cluster == "slurm":
        print(f"watch:    squeue -j {job.job_id}; tail -f {job.paths.stdout}")
    sys.stdout.flush()
    if args.wait:
        try:
            print(f"result:   {job.results()[0]}")  # one per task: all the run folder
        except Exception as err:  # submitit re-raises the task's failure
            print(f"failed:   {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
