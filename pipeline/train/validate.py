"""Exact top-1/top-5 error over the whole validation set, in any number of processes."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.data.device_augment import DeviceInput
from pipeline.models import forward_with_aux

from .metrics import Tally


@torch.no_grad()
def validate(models: list[torch.nn.Module], batches, accelerator, *, device_input: DeviceInput,
             expected: int, where: str, on_skipped=None, on_batch=None) -> list[dict[str, float]]:
    """Errors and loss of each model; one decoding pass serves all of them (the trained weights
    and their EMA). The records of samples that cannot be read go to ``on_skipped(records)``; the
    all-reduced counts plus those skipped must equal ``expected`` (the manifest's). ``on_batch()``
    is called after every batch (the stall watch's beat)."""
    modes = [m.training for m in models]
    for model in models:
        model.eval()
    tallies = [Tally() for _ in models]
    skipped = 0
    for images, labels, records in batches:
        if records:
            skipped += len(records)
            on_skipped(records)
        if not labels.numel():
            continue
        inputs = device_input(images, distort=False)
        labels = labels.to(accelerator.device, non_blocking=True)
        for model, tally in zip(models, tallies):
            with accelerator.autocast():
                logits = forward_with_aux(model, inputs).logits.float()
            tally.add(logits, labels, F.cross_entropy(logits, labels, reduction="sum"))
        if on_batch is not None:
            on_batch()
    for model, mode in zip(models, modes):
        model.train(mode)
    skipped = int(accelerator.reduce(torch.tensor([skipped], device=accelerator.device), reduction="sum").item())
    results = []
    for tally in tallies:
        total = tally.reduce(accelerator)
        if total.count + skipped != expected:
            raise RuntimeError(f"validation counted {total.count} samples and skipped {skipped}, "
                               f"the manifest of {where} says {expected}")
        results.append({**total.errors(), "count": total.count, "skipped": skipped})
    return results
