"""Top-k error from counts, so that errors over any number of processes are exact.

Counts stay on the device (no host synchronisation per batch) until they are reduced.
"""
from __future__ import annotations

import torch

from pipeline.data.prepared import IGNORE_LABEL


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """For each k, the number of samples whose label is among the k highest logits."""
    k_max = min(max(ks), logits.shape[1])
    hits = logits.topk(k_max, dim=1).indices.eq(labels[:, None])
    return torch.stack([hits[:, : min(k, k_max)].any(dim=1).sum() for k in ks])


class Tally:
    """Summed sample count, top-1 and top-5 hits and loss over batches (and processes)."""

    def __init__(self):
        self.totals: torch.Tensor | None = None  # [count, correct1, correct5, loss_sum], float64

    @staticmethod
    def counts(logits: torch.Tensor, labels: torch.Tensor, loss_sum: torch.Tensor) -> torch.Tensor:
        """One batch's [count, correct1, correct5, loss_sum], to add to one or more tallies. Samples
        labelled IGNORE_LABEL (skipped) are not counted, and never hit."""
        count = labels.ne(IGNORE_LABEL).sum().reshape(1)
        row = torch.cat([count, topk_correct(logits, labels)]).double()
        return torch.cat([row, loss_sum.detach().double().reshape(1)])

    def add_counts(self, row: torch.Tensor) -> None:
        self.totals = row if self.totals is None else self.totals + row

    def add(self, logits: torch.Tensor, labels: torch.Tensor, loss_sum: torch.Tensor) -> None:
        self.add_counts(self.counts(logits, labels, loss_sum))

    def reduce(self, accelerator) -> "Tally":
        totals = self.totals if self.totals is not None else torch.zeros(4, dtype=torch.float64, device=accelerator.device)
        reduced = Tally()
        reduced.totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum")
        return reduced

    @property
    def count(self) -> int:
        return 0 if self.totals is None else int(self.totals[0])

    def errors(self) -> dict[str, float]:
        count, c1, c5, loss = (self.totals.tolist() if self.totals is not None else [0.0] * 4)
        n = max(count, 1)
        return {"top1_error": 1 - c1 / n, "top5_error": 1 - c5 / n, "loss": loss / n}
