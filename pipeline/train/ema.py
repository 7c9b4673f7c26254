"""The Polyak average of the weights (the paper's final model), kept on the device without
waiting for it, warmed up, and one model on every rank.

The average itself is torch's ``AveragedModel`` (``get_ema_multi_avg_fn``), registered with
Accelerate for checkpoints; ``update_ema`` does its update's arithmetic without host reads.
"""
from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel


@torch.no_grad()
def update_ema(ema: AveragedModel, model: torch.nn.Module, decay: float, warmup: bool = True) -> None:
    """``ema.update_parameters(model)`` for an average built with ``get_ema_multi_avg_fn(decay)``,
    the same arithmetic without its two reads of ``n_averaged`` on the host (each waits for the
    device): the first average copies the weights, later ones move ``1 - decay`` of the way to
    them, chosen on the device. ``warmup``: the n-th average decays by at most (1 + n) / (10 + n)
    (timm's warm-up), so that early on the average follows the weights instead of keeping the
    random initial ones, whose batch-norm statistics make it predict one class.

    ``n_averaged`` must be on the weights' device (``build_run`` makes it so): the weight of the
    update is then computed there and never read by the host."""
    n = ema.n_averaged
    first = n.eq(0)
    rate = ((1 + n) / (10 + n)).double().clamp(max=decay) if warmup else decay  # in float64, as decay is
    pairs = list(zip((*ema.module.parameters(), *ema.module.buffers()), (*model.parameters(), *model.buffers())))
    by_dtype: dict[torch.dtype, tuple[list, list]] = {}
    for averaged, current in pairs:
        if averaged.is_floating_point():
            group = by_dtype.setdefault(averaged.dtype, ([], []))
            group[0].append(averaged)
            group[1].append(current.detach())
        else:  # integer buffers (batch norm's num_batches_tracked), as AveragedModel treats them
            averaged.copy_(torch.where(first, current, averaged * rate + current * (1 - rate)))
    for dtype, (averaged, current) in by_dtype.items():
        weight = torch.where(first, 1.0, 1.0 - rate).to(dtype)
        # A 0-dim tensor as the weight would be read on the host (torch takes it as a Python
        # number); the same tensor once per averaged tensor, in a list, stays on the device.
        torch._foreach_lerp_(averaged, current, [weight] * len(averaged))
    ema.n_averaged += 1


def sync_ema_buffers(ema: AveragedModel | None, accelerator) -> None:
    """Each rank averages its own model's batch-norm statistics (from its own batches) into its
    EMA; before the EMA is validated or saved, every rank takes their mean, so that all ranks
    hold one EMA. The average is linear in those statistics, so when it is taken changes nothing."""
    if ema is None or accelerator.num_processes == 1:
        return
    buffers = [b for b in ema.module.buffers() if b.is_floating_point()]
    if buffers:
        flat = torch.cat([b.flatten() for b in buffers])
        torch.distributed.all_reduce(flat)
        parts = flat.div_(accelerator.num_processes).split([b.numel() for b in buffers])
        torch._foreach_copy_(buffers, [part.view_as(b) for part, b in zip(parts, buffers)])
