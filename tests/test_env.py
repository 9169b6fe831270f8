"""Rank environment from Slurm: host-list expansion and rank derivation for multi-node jobs."""

import os
import subprocess
import sys

import pytest

from mimkit.distributed.env import (
    expand_hostlist,
    expand_tasks_per_node,
    init_rank_env,
    is_srun_task,
    master_port_from_job_id,
    rank_env_from_slurm,
)


@pytest.mark.parametrize("hostlist, hosts", [
    ("gpu[01-04]", ["gpu01", "gpu02", "gpu03", "gpu04"]),
    ("a1,b[3-5]", ["a1", "b3", "b4", "b5"]),
    ("node[1,3-4]", ["node1", "node3", "node4"]),
    ("n[008-011]", ["n008", "n009", "n010", "n011"]),
    ("gpu[09-10]", ["gpu09", "gpu10"]),
    ("single", ["single"]),
    ("vm", ["vm"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("x[1-2],y,z[05,7]", ["x1", "x2", "y", "z05", "z7"]),
    ("a-b.c[1-2].lan", ["a-b.c1.lan", "a-b.c2.lan"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-04", "gpu01-04]", "gpu[4-1]", "gpu[a-b]"])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        expand_hostlist(bad)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("4(x2),3") == [4, 4, 3]
    assert expand_tasks_per_node("2") == [2]
    assert expand_tasks_per_node("1,2(x2)") == [1, 2, 2]


def slurm_task(procid: int, nodeid: int, localid: int, *, nodelist="gpu[01-02]", ntasks=8,
               tasks_per_node="4(x2)", job_id="4242") -> dict:
    return {"SLURM_JOB_ID": job_id, "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid),
            "SLURM_NTASKS": str(ntasks), "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid),
            "SLURM_JOB_NODELIST": nodelist, "SLURM_TASKS_PER_NODE": tasks_per_node}


def test_ranks_for_two_nodes_of_four_tasks():
    # srun's block distribution: ranks 0-3 on gpu01, 4-7 on gpu02.
    seen = []
    for procid in range(8):
        env = rank_env_from_slurm(slurm_task(procid, nodeid=procid // 4, localid=procid % 4))
        assert env["RANK"] == str(procid)
        assert env["WORLD_SIZE"] == "8"
        assert env["LOCAL_RANK"] == str(procid % 4)
        assert env["LOCAL_WORLD_SIZE"] == "4"
        assert env["NODE_RANK"] == str(procid // 4)
        assert env["MASTER_ADDR"] == "gpu01"
        seen.append(env["MASTER_PORT"])
    assert len(set(seen)) == 1, "every rank must compute the same port"


def test_master_addr_is_first_host_of_mixed_list():
    env = rank_env_from_slurm(slurm_task(5, 2, 1, nodelist="a1,b[3-5]", ntasks=8, tasks_per_node="2(x4)"))
    assert env["MASTER_ADDR"] == "a1"
    assert env["NODE_RANK"] == "2"
    assert env["LOCAL_WORLD_SIZE"] == "2"


def test_uneven_tasks_per_node():
    env = rank_env_from_slurm(slurm_task(4, 1, 0, nodelist="n[1-2]", ntasks=5, tasks_per_node="4,1"))
    assert env["LOCAL_WORLD_SIZE"] == "1"


def test_step_variables_win_over_job_variables():
    # `srun -n 2 -N 1` inside a 2-node allocation of 8 tasks: the step is the world.
    environ = slurm_task(1, 0, 1) | {"SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "gpu02",
                                      "SLURM_STEP_TASKS_PER_NODE": "2"}
    env = rank_env_from_slurm(environ)
    assert (env["WORLD_SIZE"], env["MASTER_ADDR"], env["LOCAL_WORLD_SIZE"]) == ("2", "gpu02", "2")


def test_port_depends_on_job_id_only():
    a = rank_env_from_slurm(slurm_task(0, 0, 0, job_id="100"))["MASTER_PORT"]
    b = rank_env_from_slurm(slurm_task(7, 1, 3, job_id="100"))["MASTER_PORT"]
    c = rank_env_from_slurm(slurm_task(0, 0, 0, job_id="101"))["MASTER_PORT"]
    assert a == b != c
    assert 1024 < master_port_from_job_id("123_4") < 32768


def test_missing_slurm_variables_raise():
    with pytest.raises(KeyError, match="SLURM_PROCID"):
        rank_env_from_slurm({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a"})


def test_init_fills_from_slurm_inside_a_step():
    environ = slurm_task(6, 1, 2)
    assert init_rank_env(environ) == "slurm"
    assert (environ["RANK"], environ["LOCAL_RANK"], environ["MASTER_ADDR"]) == ("6", "2", "gpu01")


def test_init_keeps_a_launchers_variables():
    # torchrun inside an allocation: its RANK / WORLD_SIZE describe the real processes.
    environ = slurm_task(0, 0, 0) | {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3",
                                     "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
                                     "TORCHELASTIC_RUN_ID": "x"}
    before = dict(environ)
    assert init_rank_env(environ) == "launcher"
    assert environ == before


def test_init_keeps_explicit_master_addr_under_slurm():
    environ = slurm_task(1, 0, 1) | {"MASTER_ADDR": "ib-gpu01", "MASTER_PORT": "12345"}
    init_rank_env(environ)
    assert (environ["MASTER_ADDR"], environ["MASTER_PORT"], environ["RANK"]) == ("ib-gpu01", "12345", "1")


def test_batch_shell_is_not_a_rank():
    # The batch script carries SLURM_PROCID=0 and the job's task count but no step id: a process
    # started there without srun is a single process, not rank 0 of 8.
    environ = slurm_task(0, 0, 0)
    del environ["SLURM_STEP_ID"]
    assert not is_srun_task(environ)
    assert init_rank_env(environ) == "single"
    assert (environ["RANK"], environ["WORLD_SIZE"]) == ("0", "1")
    assert 0 < int(environ["MASTER_PORT"]) < 65536


def test_module_execs_the_command_with_rank_env():
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in
               ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    environ |= slurm_task(3, 0, 3, nodelist="a1,b[3-5]", tasks_per_node="4(x2)", job_id="77")
    out = subprocess.run(
        [sys.executable, "-m", "mimkit.distributed.env", sys.executable, "-c",
         "import os; print(os.environ['RANK'], os.environ['WORLD_SIZE'], os.environ['MASTER_ADDR'])"],
        env=environ, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["3", "8", "a1"]
