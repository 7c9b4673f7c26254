"""Stop cleanly, with a checkpoint, when the scheduler says the job must end.

- ``SIGUSR2``: the warning ``#SBATCH --signal=USR2@SECONDS`` sends before the time limit:
  checkpoint and requeue the job (``scontrol requeue``), which then resumes.
- ``SIGTERM``: what SLURM sends at the time limit (without ``--signal``), on preemption (before
  SIGKILL, after GraceTime) and on ``scancel``: checkpoint and stop, without requeueing (a
  preempted job is requeued by SLURM itself when its partition says so; a cancelled one must
  not come back).

The handler only sets a flag; the flag is all-reduced at every step boundary so that every rank
stops at the same step and saves its part of the same checkpoint. The launcher forwards SIGTERM
to the training processes (torch's elastic agent does, and waits 30 s before SIGKILL) and
ignores USR2 (the batch script's task shell sets ``trap '' USR2`` before exec; the disposition
is inherited), while the training processes install this handler over both. USR2 rather than
USR1, which NCCL may claim.

Why the trainer requeues rather than the batch script on a distinct exit code: a training
process's exit code does not reach the script (``accelerate launch`` and torch's agent turn any
failure into exit code 1), and only the trainer knows the checkpoint is complete on every rank.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch

REQUEUE, STOP = 2, 1  # what a signal asks for; when both arrived, requeueing wins
ASKS = {signal.SIGUSR2: REQUEUE, signal.SIGTERM: STOP}


class PreemptionWatch:
    def __init__(self):
        self.asked = 0
        self.signal_name: str | None = None
        self._previous = {}

    def install(self) -> "PreemptionWatch":
        for sig in ASKS:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        # Nothing else: we may be anywhere, even inside a collective.
        if ASKS[signum] >= self.asked:
            self.asked, self.signal_name = ASKS[signum], signal.Signals(signum).name

    def should_stop(self, accelerator) -> int:
        """0, STOP or REQUEUE: the same answer on every rank (one tiny all-reduce per step)."""
        flag = torch.tensor([self.asked], device=accelerator.device)
        return int(accelerator.reduce(flag, reduction="max").item())

    @staticmethod
    def requeue() -> tuple[bool, str]:
        """Ask SLURM to run this job again (it resumes from the checkpoint just written): whether
        it did, and what to tell the user."""
        job = os.environ.get("SLURM_JOB_ID")
        if not job:
            return False, "not a SLURM job: not requeued; run the same command again to resume"
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if result.returncode != 0:
            print(f"scontrol requeue {job} failed: {result.stderr.strip()}", file=sys.stderr)
            return False, f"requeue of job {job} failed; submit it again to resume"
        return True, f"job {job} requeued"
