"""Where a process waits when training stops moving.

A process that stops making progress (a hung loader worker, a write blocked on a full pipe, a
hung GPU) is seen by the others only as a collective that times out after
``train.collective_timeout_s``; the launcher then kills every process, and the one that hung
dies without a word about where it was. So the training loop beats at every step and
validation batch, and a thread of each process, when no beat has come for most of that timeout,
prints one line and the stacks of all its threads to stderr: before the others give up, once per
stall. A process waiting in a collective for a hung peer reports too (its stacks show the wait).
"""
from __future__ import annotations

import faulthandler
import sys
import threading
import time

REPORT_AFTER = 0.8  # of the collective timeout: the report must be out before the job is killed


class StallWatch:
    """``with StallWatch(timeout_s, label) as watch:`` ... ``watch.beat()`` at every unit of progress."""

    def __init__(self, collective_timeout_s: float, label: str, alone: bool = False):
        self.after_s = collective_timeout_s * REPORT_AFTER
        # Alone, nothing ends the job: the report is all there is to say where it hangs.
        self.why = (f"train.collective_timeout_s = {collective_timeout_s:g} s; no other process waits for it" if alone
                    else f"the processes waiting for it end the job after train.collective_timeout_s = {collective_timeout_s:g} s")
        self.label = label
        self.reports = 0
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        self._last = time.monotonic()  # one attribute store: nothing for the loop to wait on

    def __enter__(self) -> "StallWatch":
        self.beat()
        self._thread = threading.Thread(target=self._watch, name="stall watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        reported = None  # the beat after which the last report came: one report per stall
        while not self._stop.wait(min(5.0, self.after_s / 20)):
            last = self._last
            idle = time.monotonic() - last
            if idle < self.after_s or last == reported:
                continue
            reported = last
            print(f"{self.label}: no progress for {idle:.0f} s ({self.why}); where its threads are:",
                  file=sys.stderr, flush=True)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            self.reports += 1
