"""insloc_detco.engine.cluster_env: which launcher started a process, from its variables."""

import pytest

from insloc_detco.engine import cluster_env
from insloc_detco.engine.cluster_env import LaunchError, detect_launcher, first_host, port_for_job
from insloc_detco.engine.launch import _check_no_spawn_request

TORCHRUN = {
    "RANK": "5",
    "WORLD_SIZE": "16",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "4",
    "MASTER_ADDR": "node7",
    "MASTER_PORT": "29500",
    "TORCHELASTIC_RUN_ID": "x",
}
SRUN = {
    "SLURM_PROCID": "9",
    "SLURM_NTASKS": "16",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_ID": "0",
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_NODELIST": "gpu[003-004]",
}


def test_started_by_hand_is_no_launch():
    assert detect_launcher({}) is None
    # One SLURM task (srun python train_net.py --num-gpus 8) spawns its workers as before.
    assert detect_launcher(dict(SRUN, SLURM_NTASKS="1", SLURM_PROCID="0")) is None
    # The batch script itself is not a task of a parallel step, whatever SLURM_NTASKS says.
    assert detect_launcher(dict(SRUN, SLURM_STEP_ID="batch", SLURM_PROCID="0")) is None
    assert detect_launcher({k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}) is None


def test_torchrun_variables():
    p = detect_launcher(TORCHRUN)
    assert (p.launcher, p.rank, p.world_size, p.local_rank, p.local_world_size) == (
        "torchrun",
        5,
        16,
        1,
        4,
    )
    assert (p.node_rank, p.num_nodes, p.master_addr, p.master_port) == (1, 4, "node7", 29500)
    # A PyTorchJob pod (one process, no LOCAL_*): local rank 0 of 1.
    pod = detect_launcher(
        {k: TORCHRUN[k] for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    )
    assert (pod.local_rank, pod.local_world_size, pod.node_rank) == (0, 1, 5)


def test_srun_tasks(monkeypatch):
    monkeypatch.setattr(cluster_env.shutil, "which", lambda name: None)  # no scontrol here
    p = detect_launcher(SRUN)
    assert (p.launcher, p.rank, p.world_size, p.local_rank, p.local_world_size) == (
        "slurm",
        9,
        16,
        1,
        8,
    )
    assert p.master_addr == "gpu003" and p.master_port == port_for_job("4242")
    # torchrun inside an srun step (one task per node) is a torchrun launch.
    assert detect_launcher(dict(SRUN, **TORCHRUN)).launcher == "torchrun"
    exported = detect_launcher(dict(SRUN, MASTER_ADDR="head", MASTER_PORT="1234"))
    assert (exported.master_addr, exported.master_port) == ("head", 1234)


def test_submitit_local_tasks():
    env = {
        "SUBMITIT_EXECUTOR": "local",
        "SUBMITIT_LOCAL_GLOBALID": "1",
        "SUBMITIT_LOCAL_LOCALID": "1",
        "SUBMITIT_LOCAL_NTASKS": "2",
        "SUBMITIT_LOCAL_JOB_ID": "777",
    }
    p = detect_launcher(env)
    assert (p.launcher, p.rank, p.world_size) == ("submitit-local", 1, 2)
    assert p.master_addr == "127.0.0.1"
    assert p.master_port == port_for_job("777")


@pytest.mark.parametrize(
    "env, words",
    [
        ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR, MASTER_PORT"),
        (dict(TORCHRUN, WORLD_SIZE="two"), "WORLD_SIZE='two'"),
        (dict(TORCHRUN, RANK="16"), "Inconsistent"),
        (dict(TORCHRUN, RANK="6"), "consecutive"),  # rank 6 is not local rank 1 of 4
        (dict(SRUN, SLURM_NTASKS="15"), "same number of tasks"),
    ],
)
def test_incomplete_or_inconsistent_variables_are_errors(env, words):
    with pytest.raises(LaunchError, match=words):
        detect_launcher(env)


def test_first_host_of_slurm_node_lists(monkeypatch):
    monkeypatch.setattr(cluster_env.shutil, "which", lambda name: None)
    assert first_host("gpu[003-004,010],cpu7") == "gpu003"
    assert first_host("node12") == "node12"
    assert first_host("a1,b[1-2]") == "a1"
    assert first_host("rack[2-3]-node[07,09]") == "rack2-node07"
    with pytest.raises(LaunchError):
        first_host("")


def test_port_is_the_same_for_every_task_and_differs_between_jobs():
    assert port_for_job("4242") == port_for_job("4242")
    assert len({port_for_job(str(j)) for j in range(50)}) > 40
    assert all(20000 <= port_for_job(str(j)) < 60000 for j in range(50))


def test_launch_arguments_that_would_start_processes_are_errors():
    p = detect_launcher(TORCHRUN)
    _check_no_spawn_request(p, 1, 1, 0, None)  # the defaults
    _check_no_spawn_request(p, 4, 4, 1, "auto")  # agrees with torchrun
    with pytest.raises(LaunchError, match="--num-gpus 8"):
        _check_no_spawn_request(p, 8, 1, 0, None)
    with pytest.raises(LaunchError, match="--dist-url tcp://h:1"):
        _check_no_spawn_request(p, 1, 1, 0, "tcp://h:1")
