"""Stop cleanly, with a checkpoint, when the scheduler says the job must end.

- ``SIGUSR2``: the warning ``#SBATCH --signal=USR2@SECONDS`` sends before the time limit:
  checkpoint and requeue the job (``scontrol requeue``), which then resumes.
- ``SIGTERM``: what SLURM sends at the time limit (without ``--signal``), on preemption (before
  SIGKILL, after GraceTime) and on ``scancel``: checkpoint and stop, without requeueing (a
  preempted job is requeued by SLURM itself when its partition says so; a cancelled one must
  not come back).

The handler only sets a flag. Every rank must stop at the same step and save its part of the
same checkpoint, so the flag is agreed on in an all-reduce; during an epoch without waiting for
it (``poll``: every N steps an all-reduce is started, and the one started N steps earlier, long
finished, is read), at epoch ends with a blocking one (``should_stop``). So the host never
waits for the device to learn of a signal, and a signal is acted on within 2N steps. The launcher forwards SIGTERM
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
        self._pending = None  # (flag, work or event) of the all-reduce the last poll started

    def install(self) -> "PreemptionWatch":
        for sig in ASKS:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        # Nothing else: we may be anywhere, even inside a collective.
        if ASKS[signum] >= self.asked:
            self.asked, self.signal_name = ASKS[signum], signal.Signals(signum).name

    def should_stop(self, accelerator) -> int:
        """0, STOP or REQUEUE: the same answer on every rank, now (a blocking all-reduce)."""
        flag = torch.full((1,), self.asked, dtype=torch.int32, device=accelerator.device)
        return int(accelerator.reduce(flag, reduction="max").item())

    def poll(self, accelerator, step: int, every: int) -> int:
        """At every ``every``-th step: the answer agreed on at the previous such step (0 at the
        first), the same on every rank; and start agreeing on the flag as it is now. Other steps:
        0. Every rank must call it at the same steps, as for any collective."""
        if step % every:
            return 0
        answer = self._read_pending()
        self._pending = self._start_reduce(accelerator)
        return answer

    def _start_reduce(self, accelerator) -> tuple[torch.Tensor, object]:
        """The flag's all-reduce, started: (where its result will be, what to wait on before reading it)."""
        flag = torch.full((1,), self.asked, dtype=torch.int32, device=accelerator.device)  # a fill, no copy
        work = None
        if accelerator.num_processes > 1:
            work = torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, async_op=True)
        if flag.device.type != "cuda":
            return flag, work  # gloo works on the host: waiting for it waits for the peers only
        if work is not None:
            work.wait()  # on CUDA, orders the copy below after the all-reduce without blocking the host
        host = torch.empty(1, dtype=torch.int32, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return host, copied

    def _read_pending(self) -> int:
        if self._pending is None:
            return 0
        (value, waitable), self._pending = self._pending, None
        if isinstance(waitable, torch.cuda.Event):
            waitable.synchronize()  # long done by now: the device has run the steps since
        elif waitable is not None:
            waitable.wait()
        return int(value[0])

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
