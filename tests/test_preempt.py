"""PreemptionFlag: a signal only sets a flag; all ranks agree on it at the next step boundary."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from mimkit.distributed import preempt
from mimkit.distributed.preempt import REQUEUE_EXIT_CODE, PreemptionFlag, request_stop


def test_signal_sets_flag_and_uninstall_restores_handler():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        flag = PreemptionFlag().install()
        assert not flag.requested and not flag.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)  # Python runs the handler between bytecodes of the main thread
        assert flag.requested and flag.signal_name == "SIGUSR1"
        assert flag.should_stop() and flag.should_stop()  # sticky once agreed
        flag.uninstall()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert seen == [signal.SIGUSR1], "the handler from before install() must be back"
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_request_before_install_is_not_lost():
    request_stop(signal.SIGUSR2)  # e.g. submitit's checkpoint() during setup
    with PreemptionFlag() as flag:
        assert flag.requested and flag.signal_name == "SIGUSR2"
    assert preempt.active_flag() is None


def test_requeue_code_is_not_a_crash_code():
    assert REQUEUE_EXIT_CODE not in (0, 1, 2) and REQUEUE_EXIT_CODE < 128


WORKER = textwrap.dedent("""
    import json, os, sys, time
    import torch.distributed as dist
    from mimkit.distributed.preempt import PreemptionFlag, REQUEUE_EXIT_CODE

    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    flag = PreemptionFlag().install()
    with open(os.path.join(out, f"pid{rank}"), "w") as f:
        f.write(str(os.getpid()))
    for step in range(1, 2000):
        time.sleep(0.02 * (rank + 1))            # ranks run at different speeds
        with open(os.path.join(out, f"step{rank}.tmp"), "w") as f:
            f.write(str(step))
        os.replace(os.path.join(out, f"step{rank}.tmp"), os.path.join(out, f"step{rank}"))
        if flag.should_stop():
            with open(os.path.join(out, f"stop{rank}.json"), "w") as f:
                json.dump({"step": step, "signalled_here": flag.requested}, f)
            dist.barrier()
            dist.destroy_process_group()
            sys.exit(REQUEUE_EXIT_CODE)
    sys.exit(1)
""")


def read_int(path):
    try:
        with open(path) as f:
            return int(f.read())
    except (FileNotFoundError, ValueError):
        return None


@pytest.mark.timeout(180)
def test_two_ranks_stop_at_the_same_step(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while (read_int(tmp_path / "step1") or 0) < 5:  # both ranks are inside the loop
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "workers did not start"
            time.sleep(0.05)
        step_at_signal = read_int(tmp_path / "step1")
        os.kill(read_int(tmp_path / "pid1"), signal.SIGUSR1)  # one rank only
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stops = [json.loads((tmp_path / f"stop{r}.json").read_text()) for r in range(2)]
    assert stops[0]["step"] == stops[1]["step"], out
    assert stops[1]["step"] in (step_at_signal, step_at_signal + 1), out
    assert [s["signalled_here"] for s in stops] == [False, True]
    assert "stop requested (another rank)" in out and "stop requested (SIGUSR1 on this rank)" in out
