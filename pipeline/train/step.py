"""One training update: the loss of every head and the optimizer step (batches become network
inputs in ``device_augment``). Plain functions over the model, optimizer and scheduler (no trainer object),
so that the epoch loop shows each of them once."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from pipeline.data.prepared import IGNORE_LABEL
from pipeline.models import forward_with_aux


def compute_loss(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, aux_weight: float,
                 label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Total loss (main + aux_weight x each auxiliary head), main logits, [main, aux...] losses.

    Means over the labelled samples: a skipped sample's slot (IGNORE_LABEL, cross_entropy's
    ignore_index) adds nothing, and a batch of skipped samples only gives a zero loss, not 0/0."""
    out = forward_with_aux(model, images)
    labelled = labels.ne(IGNORE_LABEL).sum().clamp_min(1)  # no host sync
    losses = [F.cross_entropy(x.float(), labels, label_smoothing=label_smoothing, reduction="sum") / labelled
              for x in (out.logits, *out.aux)]
    total = losses[0] + aux_weight * sum(losses[1:]) if len(losses) > 1 else losses[0]
    return total, out.logits, torch.stack(losses).detach()


def optimizer_step(accelerator, model: torch.nn.Module, optimizer, scheduler, clip_grad_norm: float | None) -> bool:
    """Clip, step, clear the gradients and advance the schedule. Returns False when fp16's
    GradScaler skipped the step (inf/nan gradients): the weights did not change, so the caller
    must not average them. The schedule still advances: the learning rate is a function of the
    data position (the update's batches were consumed), so a skip never shifts the schedule.
    To tell whether to step (unfused) SGD, the GradScaler reads its inf/nan flag on the host:
    the one host read of an fp16 update (docs/performance.md)."""
    if clip_grad_norm:
        accelerator.clip_grad_norm_(model.parameters(), clip_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    applied = not optimizer.step_was_skipped
    with warnings.catch_warnings():
        if not applied:  # torch warns of a scheduler step before any optimizer step: here it is meant
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        scheduler.step()
    return applied
