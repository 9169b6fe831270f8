"""The cluster path on a real single-node Slurm started by these tests (scripts/slurm_cluster.sh).

The session fixture starts munged, slurmctld and slurmd, and stops them at the end by the PIDs the
start recorded. Requeue is fast here because the test cluster sets AuthInfo=cred_expire=10 and a
2 s scheduler interval (see the script's header).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "scripts" / "slurm_cluster.sh"
STATE_DIR = Path(os.environ.get("MIMKIT_SLURM_DIR", "/var/tmp/mimkit-slurm"))
PRETRAIN_PRESET = ROOT / "configs" / "pretrain" / "beit_tiny_cpu.yaml"

pytestmark = pytest.mark.slurm


def run(cmd, timeout=60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def recorded_pids() -> dict[str, int]:
    path = STATE_DIR / "pids"
    if not path.exists():
        return {}
    return {name: int(pid) for name, pid in (line.split() for line in path.read_text().splitlines() if line.strip())}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a root daemon seen from a non-root test run
        return True
    return True


def cluster(action: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """scripts/slurm_cluster.sh ACTION, through passwordless sudo when the tests do not run as root."""
    cmd = ["bash", str(CLUSTER), action]
    if os.geteuid() != 0:
        cmd = ["sudo", "-n", "env", f"MIMKIT_SLURM_DIR={STATE_DIR}", *cmd]
    return run(cmd, timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node Slurm; stopped at the end if this session started it."""
    if shutil.which("slurmctld") is None and shutil.which("slurmctld", path="/usr/sbin") is None:
        if shutil.which("apt-get"):
            pytest.fail("Slurm is not installed: run `bash scripts/setup.sh` (installs slurmctld slurmd slurm-client munge)")
        pytest.skip("needs the Debian Slurm packages (scripts/setup.sh)")
    if os.geteuid() != 0 and run(["sudo", "-n", "true"]).returncode != 0:
        pytest.skip("starting the test cluster needs root or passwordless sudo")
    was_running = cluster("status").returncode == 0
    started = cluster("start", timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    pids = recorded_pids()
    yield pids
    if was_running:
        return  # someone else's cluster: leave it running
    stopped = cluster("stop")
    for name, pid in pids.items():  # by the PIDs this session started, and nothing else
        if pid_alive(pid):
            run(["kill", "-KILL", str(pid)] if os.geteuid() == 0 else ["sudo", "-n", "kill", "-KILL", str(pid)])
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not any(pid_alive(pid) for pid in pids.values())


def job_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, DS_ACCELERATOR="cpu",
               TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID"):
        env.pop(key, None)
    env.update(extra)
    return env


# a 2-rank CPU job on a node that may have only 2 cores, no GPU
SMALL_JOB = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]


def sbatch(script: Path, args: list[str], out_dir: Path, env: dict, cwd: Path, sbatch_opts=()) -> str:
    out = run(["sbatch", "--parsable", *SMALL_JOB, f"--output={out_dir}/slurm-%j.out", *sbatch_opts,
               str(script), *args], env=env, cwd=cwd)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def job_info(job_id: str) -> dict[str, str]:
    out = run(["scontrol", "show", "job", "-o", job_id])
    if out.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def wait_for_job(job_id: str, timeout: float, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                                     "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")) -> dict:
    deadline = time.time() + timeout
    info: dict = {}
    while time.time() < deadline:
        info = job_info(job_id)
        if info.get("JobState") in until:
            return info
        time.sleep(0.5)
    run(["scancel", job_id])
    pytest.fail(f"job {job_id} not {until} after {timeout}s: {info}")


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def show_logs(run_dir: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted(run_dir.glob("logs/*")))


# -- a stand-in stage (2 ranks over gloo, a json "checkpoint", one log line per step and rank): it shows
#    exactly which steps each rank ran, and does not depend on the pretrain stage

STAND_IN_STAGE = textwrap.dedent("""
    import json, os, sys, time
    import torch.distributed as dist
    from mimkit.distributed.env import init_rank_env
    from mimkit.distributed.preempt import PreemptionFlag, REQUEUE_EXIT_CODE

    args = dict(a.split("=", 1) for a in sys.argv[3:])     # argv: --config FILE key=value ...
    run_dir = os.path.join(args["run.root"], args["run.name"])
    total, step_s = int(args.get("steps", 40)), float(args.get("step_s", 0.1))
    assert init_rank_env() in ("slurm", "launcher")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    flag = PreemptionFlag().install()
    os.makedirs(run_dir, exist_ok=True)
    ckpt = os.path.join(run_dir, "ckpt.json")
    step = json.load(open(ckpt))["step"] if os.path.exists(ckpt) else 0
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    print(f"rank {rank} env {env} resumes after step {step}", flush=True)
    log = open(os.path.join(run_dir, f"steps{rank}.jsonl"), "a")
    while step < total:
        time.sleep(step_s)
        step += 1
        log.write(json.dumps({"step": step, "restart": restart}) + "\\n"); log.flush()
        if flag.should_stop():
            if rank == 0:
                json.dump({"step": step}, open(ckpt + ".tmp", "w")); os.replace(ckpt + ".tmp", ckpt)
            dist.barrier()
            sys.exit(REQUEUE_EXIT_CODE)
    dist.barrier()
    if rank == 0:
        os.makedirs(os.path.join(run_dir, "export"), exist_ok=True)
        json.dump({"step": step, "world_size": dist.get_world_size()}, open(os.path.join(run_dir, "export", "done.json"), "w"))
""")


@pytest.fixture
def stand_in_root(tmp_path) -> Path:
    """A repository root whose `pretrain` stage is the stand-in, with the real slurm/ scripts."""
    root = tmp_path / "repo"
    (root / "pretrain").mkdir(parents=True)
    (root / "pretrain" / "__main__.py").write_text(STAND_IN_STAGE)
    (root / "slurm").symlink_to(ROOT / "slurm")
    (root / "tiny.yaml").write_text("{}\n")
    return root


def wait_for_steps(job_id: str, run_dir: Path, count: int, timeout: float = 90) -> None:
    """Until rank 1 logged ``count`` steps; fails at once if the job ended before."""
    def ready():
        if job_info(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"):
            pytest.fail(f"job {job_id} ended before step {count}: {job_info(job_id)}\n{show_logs(run_dir)}")
        return len(steps_of(run_dir, 1)) >= count
    wait_for(ready, timeout, f"{count} steps on rank 1")


def steps_of(run_dir: Path, rank: int) -> list[dict]:
    path = run_dir / f"steps{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# -- submitit: the same preemption path through StageJob ----------------------------------------------


@pytest.mark.timeout(240)
def test_submitit_job_is_preempted_requeued_and_loses_no_step(slurm_cluster, stand_in_root, tmp_path, monkeypatch):
    import submitit

    from mimkit.distributed.submit import StageJob

    for key, value in job_env().items():
        monkeypatch.setenv(key, value)
    runs = tmp_path / "runs"
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit" / "%j", cluster="slurm")
    executor.update_parameters(nodes=1, tasks_per_node=2, gpus_per_node=0, cpus_per_task=1, timeout_min=15,
                               name="stand-in", stderr_to_stdout=True, slurm_signal_delay_s=60,
                               slurm_additional_parameters={"requeue": True})
    stage = StageJob("pretrain", "tiny.yaml", [f"run.root={runs}", "steps=40", "step_s=0.1"], str(stand_in_root),
                     stage_dir=str(stand_in_root / "pretrain"))
    job = executor.submit(stage)
    run_dir = runs / f"pretrain-{job.job_id}"
    wait_for_steps(job.job_id, run_dir, 5)
    # what Slurm does `signal_delay_s` before the time limit: submitit's USR2 to every task
    assert run(["scancel", "--signal=USR2", job.job_id]).returncode == 0
    info = wait_for_job(job.job_id, 150)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted((tmp_path / "submitit").rglob("*.out")))
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", logs
    assert job.results() == [str(run_dir)] * 2
    for rank in (0, 1):
        assert [s["step"] for s in steps_of(run_dir, rank)] == list(range(1, 41)), logs


# -- no cluster needed: what the scripts and the CLI compute ---------------------------------------------


def test_finetune_script_gives_accelerate_the_machine_rank_and_main_address(tmp_path):
    """Node 1 of `gpu[01-02]` with 4 GPUs each: accelerate gets machine rank 1 of 2, 8 processes, and
    the first host and the job's port as the main process address."""
    fake_python = tmp_path / "python"
    fake_python.write_text(f'#!/bin/bash\nif [ "$1 $2" = "-m mimkit.distributed.env" ]; then exec {sys.executable} "$@"; fi\n'
                           'echo "$@"\n')
    fake_python.chmod(0o755)
    (tmp_path / "ft.yaml").write_text("{}\n")
    env = job_env(MIMKIT_DRY_RUN="1", MIMKIT_ROOT=str(ROOT), PYTHON=str(fake_python), SLURM_JOB_NAME="finetune",
                  SLURM_JOB_ID="12", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="4")
    dry = run(["bash", str(ROOT / "slurm" / "finetune.sh"), str(tmp_path / "ft.yaml"), "model.init=x"], env=env)
    assert dry.returncode == 0, dry.stderr
    srun_cmd = shlex.split(dry.stdout.splitlines()[0])
    assert srun_cmd[0] == "srun" and "--ntasks-per-node=1" in srun_cmd
    task_cmd = srun_cmd[srun_cmd.index(str(fake_python)):]
    # what srun's task on the second node sees
    task_env = job_env(SLURM_JOB_ID="12", SLURM_STEP_ID="0", SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_LOCALID="0",
                       SLURM_NODEID="1", SLURM_JOB_NODELIST="gpu[01-02]", SLURM_TASKS_PER_NODE="1(x2)")
    out = run(task_cmd, env=task_env)
    assert out.returncode == 0, out.stderr
    args = out.stdout.split()
    value = lambda flag: args[args.index(flag) + 1]  # noqa: E731
    assert args[:2] == ["-m", "accelerate.commands.launch"]
    assert (value("--num_machines"), value("--num_processes"), value("--machine_rank")) == ("2", "8", "1")
    assert (value("--main_process_ip"), value("--main_process_port")) == ("gpu01", "20012")
    assert "--multi_gpu" in args
    assert args[args.index("finetune"):] == ["finetune", "--config", str(tmp_path / "ft.yaml"), "run.root=runs",
                                              "run.name=finetune-12", "model.init=x"]


def test_sbatch_script_refuses_to_run_outside_slurm(tmp_path):
    env = job_env(MIMKIT_ROOT=str(ROOT))
    out = run(["bash", str(ROOT / "slurm" / "pretrain.sh"), "configs/none.yaml"], env=env, cwd=tmp_path)
    assert out.returncode == 2 and "sbatch" in out.stderr


def test_submit_cli_parses_options_and_overrides():
    from mimkit.distributed.submit import build_parser, split_run_overrides

    args = build_parser().parse_intermixed_args(["pretrain", "c.yaml", "optim.lr=1e-3", "--nodes", "4", "run.name=x",
                                                 "--gpus-per-node", "8", "--executor", "slurm", "--partition", "gpu"])
    assert (args.stage, args.config, args.nodes, args.gpus_per_node, args.partition) == ("pretrain", "c.yaml", (4, 4), 8, "gpu")
    assert split_run_overrides(args.overrides, "pretrain", "77") == ("runs", "x", ["optim.lr=1e-3"])
    assert split_run_overrides(["a=1"], "finetune", "77") == ("runs", "finetune-77", ["a=1"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["nonsense", "c.yaml"])
    for bad in ("0", "4-2", "two"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["pretrain", "c.yaml", "--nodes", bad])


def test_submit_checks_the_config_first_and_shows_the_stage_keys(tmp_path):
    """A typo fails at submission, in one line naming the key, and nothing reaches the queue;
    `mimkit submit STAGE --help` lists the stage's keys after submit's own options."""
    cmd = [sys.executable, "-m", "mimkit.cli", "submit", "pretrain", str(PRETRAIN_PRESET), "optim.lrr=1",
           f"run.root={tmp_path}", "--executor", "local"]
    out = run(cmd, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == ("mimkit submit: nothing submitted: pretrain: unknown config key 'optim.lrr' in "
                                  "overrides (did you mean 'optim.lr'?)")
    assert not (tmp_path / "submitit").exists()
    out = run([sys.executable, "-m", "mimkit.cli", "submit", "pretrain", "--help"], timeout=120, cwd=tmp_path)
    assert out.returncode == 0 and "--nodes N|MIN-MAX" in out.stdout
    assert re.search(r"^  optim\.lr +float = ", out.stdout, re.M) and "[method] with objective=milan" in out.stdout


def test_submit_with_a_node_range_asks_sbatch_for_the_range(tmp_path):
    """`--nodes 2-4`: the job script submitit writes asks Slurm for 2 to 4 nodes (a requeue may come back
    on any count in the range, and the run resumes on the world size it gets); a fixed count stays fixed."""
    import submitit

    from mimkit.distributed.submit import build_parser, slurm_parameters

    def sbatch_lines(nodes: str) -> list[str]:
        args = build_parser().parse_intermixed_args(["pretrain", "c.yaml", "--nodes", nodes, "--gpus-per-node", "8"])
        executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
        executor.update_parameters(**slurm_parameters(args))
        text = executor._executor._make_submission_file_text("python -c pass", "job")  # submitit's own writer
        return [line for line in text.splitlines() if line.startswith("#SBATCH --nodes")]

    assert sbatch_lines("2-4") == ["#SBATCH --nodes=2-4"]
    assert sbatch_lines("3") == ["#SBATCH --nodes=3"]


# -- the real thing: 2 ranks of DeepSpeed pretraining (tiny BEiT preset on CPU) -------------------------


@pytest.fixture(scope="module")
def pretrain_assets(tmp_path_factory):
    """A random tiny dVAE export and the 32 px demo shards; overrides that keep a run to seconds."""
    from mimkit.data.demo import make_demo_data
    from mimkit.checkpoint.tokenizer_export import save_random_tokenizer_export

    root = tmp_path_factory.mktemp("slurm_pretrain")
    tok = save_random_tokenizer_export(root / "tok", "dvae", input_size=32, seed=3)
    demo = make_demo_data(root / "demo", image_size=32, images_per_shard=50)

    def overrides(steps: int, **extra) -> list[str]:
        base = {"data.shards": demo.shards_dir, "method.tokenizer": tok, "run.root": root / "runs",
                "run.steps": steps, "run.log_every": 1, "run.save_every": 1000, "data.num_workers": 0,
                "data.batches_per_epoch": 5, "data.batch_size": 8, "optim.warmup_steps": 2}
        base.update(extra)
        return [f"{k}={v}" for k, v in base.items()]

    return root, overrides


def loss_steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if "loss" in r]


def assert_exported(run_dir: Path, steps: int) -> None:
    export = run_dir / "export"
    assert (export / "model.safetensors").stat().st_size > 0, show_logs(run_dir)
    meta = json.loads((export / "mimkit.json").read_text())
    assert meta["step"] == steps, meta


@pytest.mark.timeout(300)
def test_sbatch_pretrain_runs_two_deepspeed_ranks_and_exports(slurm_cluster, pretrain_assets):
    root, overrides = pretrain_assets
    job = sbatch(ROOT / "slurm" / "pretrain.sh", [str(PRETRAIN_PRESET), *overrides(6)], root,
                 job_env(RUN_ROOT=str(root / "runs")), cwd=ROOT)
    info = wait_for_job(job, 240)
    run_dir = root / "runs" / f"pretrain-{job}"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", show_logs(run_dir)
    assert [r["step"] for r in loss_steps(run_dir)] == [1, 2, 3, 4, 5, 6]
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["world_size"] == 2, env
    assert_exported(run_dir, 6)
    assert {p.name for p in (run_dir / "logs").iterdir()} == {f"{job}.out", f"{job}-rank0.out", f"{job}-rank1.out"}


@pytest.mark.timeout(300)
def test_sbatch_pretrain_preempted_saves_requeues_and_finishes_without_lost_steps(slurm_cluster, pretrain_assets):
    root, overrides = pretrain_assets
    steps = 60  # a few seconds of steps after a ~30 s start: the signal lands mid-run
    job = sbatch(ROOT / "slurm" / "pretrain.sh", [str(PRETRAIN_PRESET), *overrides(steps)], root,
                 job_env(RUN_ROOT=str(root / "runs")), cwd=ROOT)
    run_dir = root / "runs" / f"pretrain-{job}"

    def training():
        if job_info(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"):
            pytest.fail(f"job {job} ended before it was signalled\n{show_logs(run_dir)}")
        return len(loss_steps(run_dir)) >= 2
    wait_for(training, 180, "2 logged steps")
    assert run(["scancel", "--signal=USR1", job]).returncode == 0  # what --signal=USR1@120 does
    info = wait_for_job(job, 240)
    logs = show_logs(run_dir)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", logs
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    preempted = [r for r in records if r.get("event") == "preempted"]
    assert len(preempted) == 1 and preempted[0]["step"] < steps, logs
    stop = preempted[0]["step"]
    # every step trained exactly once: 1..stop before the requeue, stop+1..steps after it
    assert [r["step"] for r in loss_steps(run_dir)] == list(range(1, steps + 1)), logs
    end = [r for r in records if r.get("event") == "end"]
    assert len(end) == 1 and end[0]["step"] == steps and end[0]["samples"] == steps * 16, end
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"
    assert_exported(run_dir, steps)
    batch_log = (run_dir / "logs" / f"{job}.out").read_text()
    assert "scontrol requeue" in batch_log and "restart 1" in batch_log
    assert "resumed_from_step" in (run_dir / "environment.json").read_text()
    assert json.loads((run_dir / "environment.json").read_text())["resumed_from_step"] == stop


@pytest.mark.timeout(360)
def test_sbatch_pretrain_preempted_at_two_tasks_is_requeued_at_one_and_loses_no_step(slurm_cluster, pretrain_assets):
    """The requeued job comes back with 1 task instead of 2 (on a real cluster: fewer nodes, with
    `sbatch --nodes=MIN-MAX`; here one node, so the pending job's task count is changed by hand): the
    script starts as many ranks as the allocation has, and the run resumes from the 2-rank checkpoint
    through DeepSpeed's universal form."""
    root, overrides = pretrain_assets
    steps = 40
    job = sbatch(ROOT / "slurm" / "pretrain.sh", [str(PRETRAIN_PRESET), *overrides(steps)], root,
                 job_env(RUN_ROOT=str(root / "runs")), cwd=ROOT)
    run_dir = root / "runs" / f"pretrain-{job}"
    wait_for(lambda: len(loss_steps(run_dir)) >= 2, 180, "2 logged steps")
    assert run(["scancel", "--signal=USR1", job]).returncode == 0
    wait_for(lambda: job_info(job).get("Restarts") == "1" and job_info(job).get("JobState") == "PENDING", 120,
             "the requeued job, pending")
    update = run(["scontrol", "update", f"JobId={job}", "NumTasks=1", "TasksPerNode=1", "MinCPUsNode=1"])
    assert update.returncode == 0, update.stderr
    info = wait_for_job(job, 240)
    logs = show_logs(run_dir)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", logs
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stop = [r["step"] for r in records if r.get("event") == "preempted"]
    assert len(stop) == 1 and stop[0] < steps, logs
    assert [r["step"] for r in loss_steps(run_dir)] == list(range(1, steps + 1)), logs  # no step lost or repeated
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["world_size"] == 1 and env["resumed_from_step"] == stop[0], env
    assert (run_dir / "checkpoints" / "universal" / f"step_{stop[0]:08d}" / "complete.json").is_file()
    end = [r for r in records if r.get("event") == "end"]
    assert end[0]["samples"] == stop[0] * 16 + (steps - stop[0]) * 8, end  # 2 x 8 a step, then 1 x 8
    assert_exported(run_dir, steps)


# -- mimkit submit: the CLI through submitit, on the test Slurm and with the local executor --------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("executor", ["slurm", "local"])
def test_mimkit_submit_runs_pretrain(request, pretrain_assets, executor, tmp_path, monkeypatch):
    if executor == "slurm":
        request.getfixturevalue("slurm_cluster")
    root, overrides = pretrain_assets
    name = f"submit-{executor}"
    for key, value in job_env().items():
        monkeypatch.setenv(key, value)
    cmd = [sys.executable, "-m", "mimkit.cli", "submit", "pretrain", str(PRETRAIN_PRESET), *overrides(4),
           f"run.name={name}", "--executor", executor, "--nodes", "1", "--gpus-per-node", "0",
           "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "10", "--wait"]
    out = run(cmd, timeout=280, cwd=tmp_path)
    run_dir = root / "runs" / name
    assert out.returncode == 0, out.stdout + out.stderr
    printed = dict(re.findall(r"^(\w[\w ]*?):\s+(.*)$", out.stdout, re.M))
    assert printed["job id"].split()[0].isdigit() and f"({executor})" in printed["job id"]
    assert Path(printed["stdout"]).is_file() and printed["run"] == str(run_dir)
    assert printed["result"] == str(run_dir)
    assert [r["step"] for r in loss_steps(run_dir)] == [1, 2, 3, 4]
    assert json.loads((run_dir / "environment.json").read_text())["world_size"] == 2
    assert_exported(run_dir, 4)


# -- a dead rank: srun ends its peers, nothing of the job outlives it ----------------------------------

DEAD_PEER_STAND_IN = textwrap.dedent("""
    import os, signal, time
    from mimkit.distributed.env import init_rank_env

    init_rank_env()
    if os.fork() == 0:  # a helper process of the rank (what a DataLoader worker is)
        from mimkit.distributed.lifetime import die_with_parent
        die_with_parent(os.getppid())
        while True:
            time.sleep(1)
    if os.environ["RANK"] == "1":
        time.sleep(2)
        os.kill(os.getpid(), signal.SIGKILL)
    while True:  # rank 0 never notices, as a rank waiting in an NCCL collective on a dead peer
        time.sleep(1)
""")


@pytest.mark.timeout(240)
def test_sbatch_job_ends_within_a_minute_when_a_rank_is_sigkilled(slurm_cluster, tmp_path):
    """srun --wait (slurm/common.sh) kills the rank that waits on its dead peer; no process of the job
    (ranks, their helpers) is left once the job has ended."""
    root = tmp_path / "repo"
    (root / "pretrain").mkdir(parents=True)
    (root / "pretrain" / "__main__.py").write_text(DEAD_PEER_STAND_IN)
    (root / "slurm").symlink_to(ROOT / "slurm")
    (root / "tiny.yaml").write_text("{}\n")
    marker = os.urandom(8).hex()
    env = job_env(MIMKIT_ROOT=str(root), RUN_ROOT=str(tmp_path / "runs"), MIMKIT_TEST_RUN_MARKER=marker)
    job = sbatch(ROOT / "slurm" / "pretrain.sh", ["tiny.yaml"], tmp_path, env, cwd=root)
    run_dir = tmp_path / "runs" / f"pretrain-{job}"
    wait_for(lambda: job_info(job).get("JobState") not in ("PENDING", "CONFIGURING", None), 60, "the job to start")
    started = time.time()
    info = wait_for_job(job, 120)
    assert time.time() - started < 2 + 60, f"the job outlived its killed rank by a minute: {info}"
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", f"{info}\n{show_logs(run_dir)}"
    needle = f"MIMKIT_TEST_RUN_MARKER={marker}".encode()
    def survivors():
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    found.append(int(pid))
            except OSError:
                continue
        return found
    deadline = time.time() + 10
    while survivors() and time.time() < deadline:
        time.sleep(0.2)
    left = survivors()
    for pid in left:
        os.kill(pid, 9)
    assert not left, f"processes of job {job} alive after it ended: {left}"
