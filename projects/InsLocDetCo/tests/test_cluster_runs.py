"""Multi-process runs as clusters start them, on the CPU over gloo: torchrun, submitit's local
executor, PyTorchJob-style processes; preemption and resume, lost ranks, readouts."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from insloc_testing import PROJECT_DIR

from insloc_detco.checkpoint import verify_checksum

pytestmark = pytest.mark.slow

CONFIG = "instant_test/pretrain_moco_v2.yaml"
# A job of two CPU tasks on submitit's local executor (real processes, no cluster).
LOCAL_JOB = [
    "--slurm",
    "--submitit-cluster",
    "local",
    "--gpus-per-node",
    "0",
    "--tasks-per-node",
    "2",
]


def _opts(out, max_iter=6, period=100):
    return [
        "--config-file",
        CONFIG,
        "SOLVER.MAX_ITER",
        str(max_iter),
        "SOLVER.CHECKPOINT_PERIOD",
        str(period),
        "SOLVER.LOG_PERIOD",
        "1",
        "SEED",
        "3",
        "OUTPUT_DIR",
        str(out),
    ]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _torchrun(script, *args, nproc=2):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        script,
        *map(str, args),
    ]


def _run(cmd, timeout=900, **env):
    proc = subprocess.run(
        cmd, cwd=PROJECT_DIR, env=_env(**env), capture_output=True, text=True, timeout=timeout
    )
    return proc


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def _wait_for_iteration(out, iteration, procs, timeout=600):
    """Until metrics.json records ``iteration`` (fails if a process ends first)."""
    metrics = os.path.join(out, "metrics.json")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(metrics):
            with open(metrics) as f:
                done = [json.loads(line).get("iteration", -1) for line in f if line.strip()]
            if done and max(done) >= iteration:
                return
        assert all(p.poll() is None for p in procs), "a process ended before the signal"
        time.sleep(0.2)
    raise AssertionError(f"no iteration {iteration} in {metrics} after {timeout} s")


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_state(a, b):
    """Both encoders and the queues (model), momentum buffers and lr (optimizer), schedule
    and iteration: bit-equal."""
    a, b = _load(a), _load(b)
    assert a["iteration"] == b["iteration"]
    assert a["model"].keys() == b["model"].keys()
    assert any(k.startswith("encoder_k.") for k in a["model"]) and "queue.keys" in a["model"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    oa, ob = a["trainer"]["_trainer"]["optimizer"], b["trainer"]["_trainer"]["optimizer"]
    assert [g["lr"] for g in oa["param_groups"]] == [g["lr"] for g in ob["param_groups"]]
    for k in oa["state"]:
        assert torch.equal(oa["state"][k]["momentum_buffer"], ob["state"][k]["momentum_buffer"])
    ha, hb = a["trainer"]["hooks"], b["trainer"]["hooks"]
    assert ha["LRScheduler"] == hb["LRScheduler"]
    assert ha["RunStateHook"]["seed"] == hb["RunStateHook"]["seed"] == 3


def _descendants(pid):
    """Child processes, recursively (trainers and their loader workers)."""
    out = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        return out
    for c in children:
        out += [c] + _descendants(c)
    return out


@pytest.fixture(scope="module")
def reference(module_folder):
    """An uninterrupted 2-process torchrun run."""
    out = module_folder("torchrun")
    log = _ok(_run(_torchrun("train_net.py", *_opts(out))))
    return out, log


def test_torchrun_joins_and_matches_detectron2_launch(reference, tmp_path):
    out, log = reference
    assert "World size: 2" in log and "World size: 1" not in log
    assert os.path.exists(out / "log.txt.rank1")
    _ok(
        _run(
            [
                sys.executable,
                "train_net.py",
                "--num-gpus",
                "2",
                "--dist-url",
                "auto",
                *_opts(tmp_path),
            ]
        )
    )  # the default URL's port is per user, not per run
    assert_same_state(out / "model_final.pth", tmp_path / "model_final.pth")


def test_num_gpus_under_torchrun_is_an_error(tmp_path):
    proc = _run(_torchrun("train_net.py", "--num-gpus", "8", *_opts(tmp_path)))
    assert proc.returncode != 0
    assert "train_net.py: error: This process was started by torchrun" in proc.stderr
    assert "--num-gpus 8" in proc.stderr and not os.path.exists(tmp_path / "metrics.json")


def _signal_iteration_and_stop(log):
    """(iteration when the signal came, iteration saved) from a preempted run's log."""
    received = [line for line in log.splitlines() if "received at iteration" in line]
    stopped = [line for line in log.splitlines() if "Stopped after iteration" in line]
    assert received and stopped, log[-3000:]
    return (
        int(received[0].split("received at iteration ")[1].split(":")[0]),
        int(stopped[0].split("Stopped after iteration ")[1].split()[0]),
    )


def test_preempted_torchrun_run_resumes_to_the_same_state(reference, tmp_path):
    cmd = _torchrun("train_net.py", *_opts(tmp_path))
    agent = subprocess.Popen(
        cmd,
        cwd=PROJECT_DIR,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_for_iteration(tmp_path, 1, [agent])
    agent.send_signal(signal.SIGTERM)  # as Kubernetes does; torchrun signals its workers' groups
    log = agent.communicate(timeout=300)[0]
    assert agent.returncode != 0
    signalled, saved = _signal_iteration_and_stop(log)
    assert saved >= signalled  # the iteration in progress is kept: nothing is redone
    ckpt = tmp_path / f"model_{saved:07d}.pth"
    assert verify_checksum(str(ckpt)) and _load(ckpt)["iteration"] == saved
    assert (tmp_path / "last_checkpoint").read_text() == ckpt.name
    # The same command again resumes by itself, right after the saved iteration.
    log2 = _ok(_run(cmd))
    assert f"Starting training from iteration {saved + 1}" in log2
    assert_same_state(reference[0] / "model_final.pth", tmp_path / "model_final.pth")


def test_submitit_local_job_is_preempted_requeued_and_resumes(reference, tmp_path):
    cmd = [sys.executable, "train_net.py", *LOCAL_JOB, "--time", "30", *_opts(tmp_path)]
    # Not a pipe: the job's controller inherits it, and a pipe would stay open until its end.
    with open(tmp_path / "submit.txt", "w") as f:
        submitter = subprocess.run(
            cmd, cwd=PROJECT_DIR, env=_env(), stdout=f, stderr=subprocess.STDOUT, timeout=300
        )
    text = (tmp_path / "submit.txt").read_text()
    assert submitter.returncode == 0, text[-3000:]
    job_id = int(text.split("Submitted job ")[1].split(":")[0])  # the local controller's pid
    _wait_for_iteration(tmp_path, 1, [])
    for pid in _descendants(job_id):  # every process of the tasks, as SLURM signals them
        os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 600
    while not (tmp_path / "model_final.pth.sha256").exists() and time.monotonic() < deadline:
        time.sleep(1)
    with open(tmp_path / "log.txt") as f:
        log = f.read()
    signalled, saved = _signal_iteration_and_stop(log)
    assert saved >= signalled and f"Starting training from iteration {saved + 1}" in log
    for _ in range(60):  # the controller ends with its tasks
        if not _descendants(job_id):
            break
        time.sleep(1)
    logs = os.listdir(tmp_path / "submitit")
    assert any(f.endswith("_0_log.out") for f in logs)
    assert any(f.endswith("_1_log.err") for f in logs)
    assert_same_state(reference[0] / "model_final.pth", tmp_path / "model_final.pth")


def test_a_submitting_launch_runs_each_call_as_a_job_whose_tasks_join(tmp_path, monkeypatch):
    """``eval_transfer.py run --slurm``'s path (``Launch.submit``, one job per trial), with
    submitit's local executor: two tasks, one process group, the job's output in its folder."""
    import argparse

    from insloc_testing import write_rank_and_world

    from insloc_detco.engine.runs import Launch, add_launch_arguments

    parser = argparse.ArgumentParser()
    add_launch_arguments(parser, slurm=True)
    options = [*LOCAL_JOB, "--time", "10", "--dist-timeout", "60"]
    launch = Launch.from_args(parser.parse_args(options))
    for k, v in _env().items():  # the job's processes inherit this environment
        monkeypatch.setenv(k, v)
    for k in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))]:
        monkeypatch.delenv(k)
    tests_dir = os.path.dirname(os.path.abspath(__file__))  # the job imports insloc_testing
    paths = [tests_dir] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    job_id = launch.submit(str(tmp_path / "submitit"), "t", write_rank_and_world, str(tmp_path))
    deadline = time.monotonic() + 300
    while len(list(tmp_path.glob("rank*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results == [{"rank": 0, "world_size": 2}, {"rank": 1, "world_size": 2}]
    assert any(f.startswith(f"{job_id}_0_log") for f in os.listdir(tmp_path / "submitit"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pytorchjob(out, world, timeout_s):
    """``world`` processes started independently, as Kubernetes' PyTorchJob pods are."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = _env(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = [
            sys.executable,
            "train_net.py",
            "--dist-timeout",
            str(timeout_s),
            *_opts(out, max_iter=200, period=2),
            "SOLVER.IMS_PER_BATCH",
            str(2 * world),
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=PROJECT_DIR,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


@pytest.mark.parametrize("world, how", [(3, signal.SIGKILL), (2, signal.SIGSTOP)])
def test_a_lost_rank_ends_the_others_with_its_name(tmp_path, world, how):
    procs = _pytorchjob(tmp_path, world, timeout_s=20)
    lost = [procs[1].pid]
    try:
        _wait_for_iteration(tmp_path, 2, procs)
        lost += _descendants(procs[1].pid)  # its loader worker, which holds its stdout too
        for pid in lost:
            os.kill(pid, how)  # killed, or frozen mid-step
        outputs = [p.communicate(timeout=300)[0] for r, p in enumerate(procs) if r != 1]
    finally:
        for pid in lost:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    for r, (p, text) in enumerate(zip([p for i, p in enumerate(procs) if i != 1], outputs)):
        assert p.returncode != 0
        assert f"LOST RANK 1 of {world}: rank 1 (no heartbeat for" in text, text[-3000:]
    name = (tmp_path / "last_checkpoint").read_text()
    assert verify_checksum(str(tmp_path / name))  # the last good checkpoint is intact


def test_readout_under_torchrun_equals_one_process(tmp_path):
    from insloc_detco.readout import demo_cls

    root = tmp_path / "cls"
    for split in ("train", "val"):  # a small generated class-folder set
        demo_cls.load_demo_cls(str(root), split, {"train": 40, "val": 24}, 64)
    args = [
        "knn",
        "random",
        "--train",
        f"class_folder:{root}/train",
        "--val",
        f"class_folder:{root}/val",
        "--num-workers",
        "0",
        "--batch-size",
        "8",
        "--k",
        "5",
        "--device",
        "cpu",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    _ok(_run([sys.executable, "eval_readout.py", *args, "--output-dir", one]))
    log = _ok(_run(_torchrun("eval_readout.py", *args, "--output-dir", two)))
    assert log.count("| random") == 1  # the table is printed once, by rank 0
    (r1,), (r2,) = (json.loads((d / "results.json").read_text()).values() for d in (one, two))
    assert (r1["world_size"], r2["world_size"]) == (1, 2)
    assert r1["metrics"] == r2["metrics"] and r1["num_val"] == r2["num_val"]
