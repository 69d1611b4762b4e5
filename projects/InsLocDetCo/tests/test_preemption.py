"""Preemption (signal -> checkpoint of one iteration -> exit) and the lost-rank watchdog's
judgement, in one process; the multi-process runs are in test_cluster_runs.py."""
import os
import signal

import pytest
import torch.distributed as dist
from detectron2.engine import HookBase, TrainerBase

from insloc_detco.engine.preemption import PreemptionHook, TrainingPreempted
from insloc_detco.engine.watchdog import Watchdog


class _Checkpointer:
    save_dir = "/nowhere"

    def __init__(self):
        self.saved = []

    def save(self, name, **kwargs):
        self.saved.append((name, kwargs))


class _SignalAt(HookBase):
    def __init__(self, iteration, signum):
        self.iteration, self.signum = iteration, signum

    def before_step(self):
        if self.trainer.iter == self.iteration:
            os.kill(os.getpid(), self.signum)


class _Trainer(TrainerBase):
    def __init__(self, max_iter):
        super().__init__()
        self.max_iter = max_iter
        self.steps = 0

    def run_step(self):
        self.steps += 1


def _train(signal_iter, signum, period=100, max_iter=10):
    trainer, ckpt = _Trainer(max_iter), _Checkpointer()
    trainer.register_hooks([_SignalAt(signal_iter, signum), PreemptionHook(ckpt, period)])
    before = signal.getsignal(signum)
    with pytest.raises(TrainingPreempted) as e:
        trainer.train(0, max_iter)
    assert signal.getsignal(signum) is before  # handlers restored after training
    return trainer, ckpt, e.value


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2])
def test_a_signal_saves_the_iteration_in_progress_and_exits_128_plus_signal(signum):
    trainer, ckpt, exit_ = _train(3, signum)
    assert ckpt.saved == [("model_0000003", {"iteration": 3})]
    assert trainer.steps == 4  # iterations 0..3: nothing after the saved one
    assert exit_.code == 128 + signum


def test_an_iteration_the_periodic_checkpointer_saved_is_not_saved_again():
    _, ckpt, _ = _train(4, signal.SIGTERM, period=5)  # (4 + 1) % 5 == 0: saved already
    assert ckpt.saved == []


def test_a_signal_in_the_last_iteration_lets_the_run_finish():
    trainer, ckpt = _Trainer(5), _Checkpointer()
    trainer.register_hooks([_SignalAt(4, signal.SIGTERM), PreemptionHook(ckpt, 100)])
    trainer.train(0, 5)  # no exception: model_final is written as usual
    assert trainer.steps == 5 and ckpt.saved == []


def test_submitit_handler_is_called_after_the_checkpoint():
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: calls.append(s))
    try:
        _, ckpt, _ = _train(2, signal.SIGUSR2)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert ckpt.saved and calls == [signal.SIGUSR2]


# ------------------------------------------------------------------------------------------
# The watchdog's judgement (a fake clock, no thread)
# ------------------------------------------------------------------------------------------
def _watchdogs(world=3, timeout=20.0):
    store, now, lost = dist.HashStore(), [0.0], []
    dogs = [Watchdog(store, r, world, timeout, on_lost=lost.append, clock=lambda: now[0])
            for r in range(world)]  # fmt: skip
    return dogs, now


def test_a_rank_that_stops_beating_is_named_after_the_silence():
    (w0, w1, w2), now = _watchdogs()
    assert (w0.period_s, w0.silence_s) == (2.0, 12.0)
    for t in range(0, 10, 2):
        now[0] = t
        assert [w.check_once() for w in (w0, w1, w2)] == [None] * 3
    fired = {}  # rank -> (time, message)
    for t in range(10, 40, 2):  # rank 1 is gone
        now[0] = t
        for w in (w0, w2):
            m = w.check_once()
            if m and w.rank not in fired:
                fired[w.rank] = (t, m)
    assert sorted(fired) == [0, 2]
    for t, m in fired.values():
        assert t - 8 > w0.silence_s  # not before the silence has passed (last beat at 8)
        assert t - 8 <= w0.silence_s + 2 * w0.period_s
        assert m.startswith("LOST RANK 1 of 3: rank 1 (no heartbeat for")


def test_a_stalled_training_loop_lists_who_is_behind():
    (w0, w1), now = _watchdogs(world=2)
    for w in (w0, w1):
        w.training = True
    w0.steps, w1.steps = 5, 4  # rank 1 never finishes step 5
    for t in range(0, 60, 2):
        now[0] = t
        m0 = w0.check_once()
        w1.check_once()
        if m0:
            break
    assert m0.startswith("STALLED: rank 0") and "0: 5, 1: 4" in m0 and "behind: rank 1" in m0
    assert now[0] > w0.timeout_s


def test_a_store_that_stops_answering_means_its_host_is_lost():
    (w0, w1), now = _watchdogs(world=2)

    class DeadStore:
        def __getattr__(self, name):
            raise ConnectionResetError("Connection reset by peer")

    w1._store = DeadStore()
    message = None
    for t in range(0, 40, 2):
        now[0] = t
        message = w1.check_once()
        if message:
            break
    assert "rendezvous store has not answered" in message and "rank 0" in message


def test_a_process_forked_during_training_still_ends_on_sigterm():
    """An evaluator's worker pool forked during training inherits the handler: SIGTERM (how
    multiprocessing.Pool ends its workers) must end it, not record a preemption there."""
    import multiprocessing

    class _ForkDuringTraining(HookBase):
        def before_step(self):
            if self.trainer.iter == 1:
                ctx = multiprocessing.get_context("fork")
                ready = ctx.Event()
                child = ctx.Process(target=lambda: (ready.set(), signal.pause()))
                child.start()
                assert ready.wait(timeout=60)  # a signal before that would be lost to the fork
                child.terminate()  # SIGTERM
                child.join(timeout=60)
                self.trainer.child_exitcode = child.exitcode

    trainer, ckpt = _Trainer(3), _Checkpointer()
    trainer.register_hooks([PreemptionHook(ckpt, 100), _ForkDuringTraining()])
    trainer.train(0, 3)
    assert trainer.child_exitcode == -signal.SIGTERM and ckpt.saved == []
