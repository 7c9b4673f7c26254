"""Stop cleanly when the scheduler warns that the job is about to end.

SLURM sends ``#SBATCH --signal=USR2@SECONDS`` to every process of the job step. The handler
only sets a flag; the flag is all-reduced at every step boundary so that every rank stops at
the same step, saves its part of the same checkpoint, and the main process asks SLURM to
requeue the job (``scontrol requeue``). USR2 rather than USR1, which NCCL may claim; the
launcher ignores it (the batch script's task shell sets ``trap '' USR2`` before exec, and the
disposition is inherited), while the training processes install this handler over it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch

# Not SIGTERM: that is also how scancel stops a job, which must not requeue it.
SIGNALS = (signal.SIGUSR2,)


class PreemptionWatch:
    def __init__(self):
        self.signalled: int | None = None
        self._previous = {}

    def install(self) -> "PreemptionWatch":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        self.signalled = signum  # nothing else: we may be anywhere, even inside a collective

    def should_stop(self, accelerator) -> bool:
        """True on every rank if any rank was signalled (one tiny all-reduce per step)."""
        flag = torch.tensor([1 if self.signalled else 0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item())

    def requeue(self) -> str:
        """Ask SLURM to run this job again; it resumes from the checkpoint just written."""
        job = os.environ.get("SLURM_JOB_ID")
        if not job:
            return "not a SLURM job: not requeued; run the same command again to resume"
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if result.returncode != 0:
            print(f"scontrol requeue {job} failed: {result.stderr.strip()}", file=sys.stderr)
            return f"requeue of job {job} failed"
        return f"job {job} requeued"
