"""A lost rank ends the run, with a message that names it, instead of hanging it.

A process that dies or freezes mid-step leaves its peers waiting in a collective: NCCL until
the process group's timeout (detectron2: 30 minutes), with a message that names an operation
but no rank. :class:`Watchdog` is a thread in every process of a multi-process run that, every
``period`` seconds, counts a heartbeat and the training steps done in the rendezvous store
(the key-value store every launch already has) and reads those of its peers:

* a peer whose heartbeat has not moved for ``silence`` seconds (6 periods, at most the
  timeout) is lost: dead, killed, frozen or unreachable;
* a store that stops answering for as long means its host is lost (rank 0, or the torchrun
  agent);
* a training loop that finishes no step for ``timeout`` seconds is stalled; the message lists
  each rank's steps and where its main thread is.

Then the process logs the message (``log.txt``, stderr) and exits at once with status
:data:`LOST_RANK_EXIT_CODE`: its main thread may be blocked in a collective that nothing else
interrupts. Checkpoints are written atomically, so the last complete one stays intact.
"""

import logging
import os
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch.distributed as dist
from detectron2.engine import HookBase

__all__ = ["LOST_RANK_EXIT_CODE", "Watchdog", "ProgressHook", "active_watchdog", "report"]

logger = logging.getLogger(__name__)

LOST_RANK_EXIT_CODE = 75  # EX_TEMPFAIL: the job may succeed when started again
_active: Optional["Watchdog"] = None


def active_watchdog() -> Optional["Watchdog"]:
    """The watchdog of this process (None in a one-process run)."""
    return _active


class Watchdog:
    def __init__(
        self,
        store,
        rank: int,
        world_size: int,
        timeout_s: float,
        on_lost: Optional[Callable[[str], None]] = None,
        clock=time.monotonic,
    ):
        """
        Args:
            store: the run's c10d store (shared by all ranks).
            timeout_s: a training loop that finishes no step for this long is stalled.
            on_lost: called with the message (default: log it and exit the process).
        """
        self._store = dist.PrefixStore("insloc_watchdog/", store)
        self.rank, self.world_size = rank, world_size
        self.timeout_s = timeout_s
        self.period_s = min(5.0, max(0.5, timeout_s / 10))
        self.silence_s = min(timeout_s, 6 * self.period_s)
        self.steps = 0  # training steps finished by this process (ProgressHook)
        self.training = False
        self._on_lost = on_lost or _exit_lost
        self._clock = clock
        start = clock()
        self._peers: Dict[int, Tuple[int, int, float]] = {
            r: (0, 0, start) for r in range(world_size) if r != rank
        }  # rank -> (heartbeat, steps, when the heartbeat last moved)
        self._own_steps = (0, start)  # (steps, since when)
        self._store_down_since: Optional[float] = None
        self._published_steps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="insloc-watchdog", daemon=True)
        self._main_ident = threading.main_thread().ident

    def start(self) -> "Watchdog":
        global _active
        _active = self
        self.check_once()
        self._thread.start()
        return self

    def stop(self):
        global _active
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.period_s)
        if _active is self:
            _active = None

    def _run(self):
        while not self._stop.wait(self.period_s):
            message = self.check_once()
            if message and not self._stop.is_set():
                self._on_lost(message)
                return

    # ------------------------------------------------------------------------------------
    def check_once(self) -> Optional[str]:
        """Beat, read the peers; returns what is lost or stalled (None: all well)."""
        now = self._clock()
        try:
            self._beat()
            self._observe(now)
            self._store_down_since = None
        except Exception as e:  # the store's host is gone, or the network
            if self._store_down_since is None:
                self._store_down_since = now
            if now - self._store_down_since > self.silence_s:
                return (
                    f"Rank {self.rank}: the rendezvous store has not answered for "
                    f"{now - self._store_down_since:.0f} s ({type(e).__name__}: {e}): its host, "
                    "rank 0 or the launcher, is lost. Ending this process."
                )
            return None
        return self._lost_message(now) or self._stall_message(now)

    def _beat(self):
        self._store.add(f"beat/{self.rank}", 1)
        self._store.add(f"steps/{self.rank}", self.steps - self._published_steps)
        self._published_steps = self.steps
        self._store.set(f"where/{self.rank}", self._main_thread_location())

    def _observe(self, now: float):
        for r, (beat, _, since) in self._peers.items():
            new_beat = self._store.add(f"beat/{r}", 0)
            steps = self._store.add(f"steps/{r}", 0)
            self._peers[r] = (new_beat, steps, now if new_beat != beat else since)
        if self.steps != self._own_steps[0] or not self.training:
            self._own_steps = (self.steps, now)

    def lost_ranks(self, now: Optional[float] = None) -> List[int]:
        now = self._clock() if now is None else now
        return [r for r, (_, _, since) in self._peers.items() if now - since > self.silence_s]

    def _lost_message(self, now: float) -> Optional[str]:
        lost = self.lost_ranks(now)
        if not lost:
            return None
        detail = ", ".join(
            f"rank {r} (no heartbeat for {now - self._peers[r][2]:.0f} s, "
            f"{self._peers[r][1]} steps done)"
            for r in lost
        )
        return (
            f"LOST RANK {', '.join(map(str, lost))} of {self.world_size}: {detail}. Rank "
            f"{self.rank} ({self.steps} steps done) ends instead of waiting for it; the last "
            "checkpoint written is intact, and a restart resumes from it."
        )

    def _stall_message(self, now: float) -> Optional[str]:
        steps, since = self._own_steps
        if not self.training or now - since <= self.timeout_s:
            return None
        all_steps = {self.rank: self.steps, **{r: p[1] for r, p in self._peers.items()}}
        behind = [r for r, s in all_steps.items() if s < max(all_steps.values())]
        return (
            f"STALLED: rank {self.rank} has finished no training step for {now - since:.0f} s "
            f"(timeout {self.timeout_s:.0f} s). Steps done per rank: "
            + ", ".join(f"{r}: {s}" for r, s in sorted(all_steps.items()))
            + (f"; behind: rank {', '.join(map(str, behind))}" if behind else "")
            + ". Main threads: "
            + self._where_everyone()
            + ". Ending this process."
        )

    def _where_everyone(self) -> str:
        places = []
        for r in range(self.world_size):
            key = f"where/{r}"
            try:
                where = self._store.get(key).decode() if self._store.check([key]) else "?"
            except Exception:
                where = "?"
            places.append(f"rank {r} in {where}")
        return "; ".join(places)

    def _main_thread_location(self) -> str:
        frame = sys._current_frames().get(self._main_ident)
        if frame is None:
            return "?"
        code = frame.f_code
        return f"{code.co_name} ({os.path.basename(code.co_filename)}:{frame.f_lineno})"

    def wait_for_lost_ranks(self) -> Optional[str]:
        """After a failed collective: wait until a silent peer counts as lost (at most
        ``silence`` + 2 periods); its message, or None if every peer still beats."""
        deadline = self._clock() + self.silence_s + 2 * self.period_s
        while self._clock() < deadline and self._thread.is_alive():
            message = self._lost_message(self._clock())
            if message:
                return message
            time.sleep(self.period_s / 2)
        return None


class ProgressHook(HookBase):
    """
    Counts finished training steps for the watchdog's stall check, which starts with the first
    finished step: the first step may compile the fast path for minutes (``MODEL.FAST_PATH``,
    docs/SPEED.md), longer than a stall timeout. Until then a lost rank is still found by its
    heartbeat, and a collective waits at most its own timeout.
    """

    def after_step(self):
        watchdog = active_watchdog()
        if watchdog is not None:
            watchdog.steps += 1
            watchdog.training = True

    def after_train(self):
        watchdog = active_watchdog()
        if watchdog is not None:
            watchdog.training = False


def report(message: str):
    """To the log file and to stderr (detectron2 logs only rank 0 to the console)."""
    logger.error(message)
    for handler in logging.getLogger().handlers + logging.getLogger("insloc_detco").handlers:
        handler.flush()
    print(message, file=sys.stderr, flush=True)


def _exit_lost(message: str):
    report(message)
    os._exit(LOST_RANK_EXIT_CODE)
