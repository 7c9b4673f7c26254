"""``data.on_bad_sample``: stop at the first sample that cannot be read, or skip and record it.

The loaders never raise on a damaged sample; its skip record comes with its batch (see
``pipeline.data``). Here the trainer applies the policy:

- ``stop``: end the run with one line naming the shard, the sample, the reason and the fix;
- ``skip``: train on (the sample's slot carries no label) and record it: every record goes to
  ``skipped_samples.jsonl`` in the run directory (with the update it belonged to and the rank),
  the running total to TensorBoard as ``data/skipped_samples``, and the run stops once more than
  ``data.max_skipped_fraction`` of an epoch's training samples were skipped, which means the data
  is damaged rather than a few odd files.

The decision is collective: at every log line (``train.log_every_steps``, the same steps on every
rank), before every checkpoint and after every validation, all ranks sum their new records (one
tiny all-reduce; the records themselves are gathered only when there are some), so every rank
stops at the same point with the same message, or trains on. Until then a bad sample's slot
carries no label, so the updates in between are sound. The counts are saved in
checkpoints, and a resumed run cuts the file back to the checkpoint's step
(``tracking.start_tracking``), so no record is lost or written twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import gather_object

from pipeline.data.prepared import BadSampleError, bad_sample_message
from pipeline.ops.launch import on_every_rank

from . import tracking

POLICIES = ("stop", "skip")


class TooManyBadSamples(BadSampleError):
    """More of an epoch was skipped than ``data.max_skipped_fraction`` allows."""


@dataclass
class BadSamples:
    policy: str  # stop or skip
    max_fraction: float
    epoch_samples: int  # training samples per epoch, all ranks
    data_dir: Path
    run_dir: Path
    pending: list[dict] = field(default_factory=list)  # this rank's, not yet written
    total: int = 0  # all ranks, since the run began (saved in checkpoints)
    in_epoch: int = 0  # all ranks, in the current epoch (saved in checkpoints)

    def add(self, records, *, step: int, epoch: int, rank: int) -> None:
        """This rank's skip records of a batch of update ``step``, or of an evaluation at ``step``."""
        self.pending.extend({**r, "step": step, "epoch": epoch + 1, "rank": rank} for r in records)

    def flush(self, accelerator) -> int:
        """Write every rank's new records (main process) and return the run's total; stop, on
        every rank alike, on the first (``stop``) or once this epoch skipped too much (``skip``).
        Every process must call it at the same point."""
        new = accelerator.reduce(torch.tensor([len(self.pending)], device=accelerator.device), reduction="sum")
        if int(new.item()):
            records = gather_object(self.pending)
            self.pending = []
            tracking.append_records(accelerator, self.run_dir / tracking.SKIPPED_FILE, records)
            train = sum(r["split"] == "train" for r in records)
            self.total += train
            self.in_epoch += train
            if self.policy == "stop":
                hint = (" To train on without such samples (each one recorded), set data.on_bad_sample=skip."
                        if records[0]["split"] == "train" else "")
                raise on_every_rank(BadSampleError(bad_sample_message(records[0], self.data_dir) + "." + hint))
        limit = self.max_fraction * self.epoch_samples
        if self.in_epoch > limit:
            raise on_every_rank(TooManyBadSamples(
                f"{self.in_epoch} training samples skipped in this epoch, over data.max_skipped_fraction="
                f"{self.max_fraction:g} of its {self.epoch_samples}: the data in {self.data_dir} is damaged "
                f"(see {self.run_dir / tracking.SKIPPED_FILE}); check it with "
                f"'python -m data_prep verify {self.data_dir}' and prepare the damaged shards again"
            ))
        return self.total

    def new_epoch(self) -> None:
        self.in_epoch = 0

    def state(self) -> dict:
        return {"skipped_samples": self.total, "skipped_in_epoch": self.in_epoch}

    def load_state(self, state: dict) -> None:
        self.total, self.in_epoch = state.get("skipped_samples", 0), state.get("skipped_in_epoch", 0)
