"""Preemption (signal -> checkpoint of one iteration -> exit) and the lost-rank watchdog's
judgement, in one process; the agreement of two gloo processes; the multi-process runs are in
test_cluster_runs.py."""

import os
import signal

import pytest
import torch
import torch.distributed as dist
from detectron2.engine import HookBase, TrainerBase
from detectron2.utils import comm
from insloc_testing import run_distributed
from torch.utils._python_dispatch import TorchDispatchMode

from insloc_detco.engine.preemption import PreemptionHook, TrainingPreempted
from insloc_detco.engine.step import DeviceMetricsTrainer
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


class _LossModel(torch.nn.Module):
    """A one-parameter model whose loss is NaN from iteration ``nan_from`` on."""

    def __init__(self, nan_from=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.nan_from, self.calls = nan_from, 0

    def forward(self, data):
        loss = self.w * data
        if self.nan_from is not None and self.calls >= self.nan_from:
            loss = loss * float("nan")
        self.calls += 1
        return {"loss_a": loss, "loss_b": 2 * loss}


class _StepTrainer(_Trainer):
    """The loop around a DeviceMetricsTrainer that flushes by itself every 100 iterations."""

    def __init__(self, max_iter, nan_from=None):
        super().__init__(max_iter)
        model = _LossModel(nan_from)
        self._trainer = DeviceMetricsTrainer(
            model,
            [torch.tensor(1.0)] * max_iter,
            torch.optim.SGD(model.parameters(), lr=0.0),
            flush_periods=(100,),
            max_iter=100,
        )

    def run_step(self):
        self._trainer.iter = self.iter
        self._trainer.run_step()


class _RecordingCheckpointer(_Checkpointer):
    """Records, at each save, whether losses were still waiting on the device."""

    def __init__(self, step):
        super().__init__()
        self.step, self.pending_at_save = step, []

    def save(self, name, **kwargs):
        self.pending_at_save.append(self.step._sums is not None)
        super().save(name, **kwargs)


def test_the_preemption_checkpoint_reads_the_device_metrics_back_first():
    trainer = _StepTrainer(10)
    ckpt = _RecordingCheckpointer(trainer._trainer)
    trainer.register_hooks([_SignalAt(3, signal.SIGTERM), PreemptionHook(ckpt, 100)])
    with pytest.raises(TrainingPreempted):
        trainer.train(0, 10)
    assert ckpt.saved == [("model_0000003", {"iteration": 3})]
    assert ckpt.pending_at_save == [False]  # flushed before the save, as every checkpoint
    # The mean over iterations 0..3 of loss_a (w * 1) and loss_b, recorded at iteration 3.
    values = trainer.storage.history("total_loss").values()
    assert values == [(3.0, 3)]


def test_a_nan_loss_is_caught_before_the_preemption_checkpoint():
    trainer = _StepTrainer(10, nan_from=2)
    ckpt = _RecordingCheckpointer(trainer._trainer)
    trainer.register_hooks([_SignalAt(3, signal.SIGTERM), PreemptionHook(ckpt, 100)])
    with pytest.raises(FloatingPointError, match=r"iteration in \[0, 3\]"):
        trainer.train(0, 10)
    assert ckpt.saved == []  # no checkpoint of a state after an unchecked NaN


# ------------------------------------------------------------------------------------------
# Two ranks agree on one iteration, with nothing dispatched between agreement iterations
# ------------------------------------------------------------------------------------------
class _DispatchedOps(TorchDispatchMode):
    """Every operator dispatched inside the block, with the devices of its tensors."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [
            a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)
        ]
        self.seen.append((func.overloadpacket.__name__, {t.device.type for t in tensors}))
        return func(*args, **(kwargs or {}))


class _ObservedPreemptionHook(PreemptionHook):
    """Records what its ``after_step`` dispatches, per iteration."""

    ops = None

    def after_step(self):
        self.ops = self.ops or {}
        with _DispatchedOps() as mode:
            try:
                super().after_step()
            finally:
                self.ops[self.trainer.iter] = mode.seen


def _two_ranks_stop_together(agree_period, signal_iter, expected):
    trainer, ckpt = _Trainer(20), _Checkpointer()
    hook = _ObservedPreemptionHook(ckpt, 100, agree_period)
    signals = [_SignalAt(signal_iter, signal.SIGUSR1)] if comm.get_rank() == 1 else []
    trainer.register_hooks(signals + [hook])
    try:
        trainer.train(0, 20)
        stopped = None
    except TrainingPreempted as e:
        assert e.code == 128 + signal.SIGUSR1
        stopped = trainer.iter
    assert comm.all_gather(stopped) == [expected, expected]  # rank 0 got no signal itself
    assert ckpt.saved == [(f"model_{expected:07d}", {"iteration": expected})]
    for it, ops in hook.ops.items():
        if (it + 1) % agree_period:
            assert ops == [], f"iteration {it}: {ops}"  # nothing at all between agreements
        else:
            assert any(name == "allreduce_" for name, _ in ops), ops
            assert all(devices <= {"cpu"} for _, devices in ops), ops  # host memory only


@pytest.mark.slow
def test_two_ranks_stop_at_the_same_agreement_iteration():
    """Rank 1 alone is signalled during iteration 5; with agreement every 4 iterations both
    ranks save and stop after iteration 7, and between agreement iterations the hook
    dispatches no operator (nothing that could wait for a device)."""
    run_distributed(_two_ranks_stop_together, world_size=2, args=(4, 5, 7))


# ------------------------------------------------------------------------------------------
# The watchdog's judgement (a fake clock, no thread)
# ------------------------------------------------------------------------------------------
def _watchdogs(world=3, timeout=20.0):
    store, now, lost = dist.HashStore(), [0.0], []
    dogs = [
        Watchdog(store, r, world, timeout, on_lost=lost.append, clock=lambda: now[0])
        for r in range(world)
    ]
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


def test_the_stall_clock_starts_with_the_first_finished_step(monkeypatch):
    """The first step may compile the fast path for longer than the timeout: not a stall."""
    from insloc_detco.engine import watchdog as watchdog_module
    from insloc_detco.engine.watchdog import ProgressHook

    (w0, w1), now = _watchdogs(world=2)
    monkeypatch.setattr(watchdog_module, "_active", w0)
    hook = ProgressHook()
    hook.before_train()
    for t in range(0, 100, 2):  # 100 s in the first step (timeout 20 s), both ranks beating
        now[0] = t
        w1.check_once()
        assert w0.check_once() is None
    hook.after_step()
    message = None
    for t in range(100, 160, 2):  # then no step for longer than the timeout
        now[0] = t
        w1.check_once()
        message = message or w0.check_once()
    assert message and message.startswith("STALLED: rank 0 has finished no training step")


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
