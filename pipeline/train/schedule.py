"""Learning-rate schedules, stepped once per optimizer update, built from torch's schedulers."""
from __future__ import annotations

import torch
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    PolynomialLR,
    SequentialLR,
    StepLR,
)

from pipeline.config import ScheduleConfig


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, updates_per_epoch: int) -> LRScheduler:
    """step: x gamma every ``step_epochs`` (the paper's 0.96 every 8 epochs); cosine: to ``min_lr``
    at the end; poly: x (1 - progress)^power to 0 at the end (BVLC's quick_solver); constant.
    An optional linear warm-up over ``warmup_epochs`` comes first; cosine and poly then span the
    updates that remain."""
    total = cfg.epochs * updates_per_epoch
    warmup = round((cfg.warmup_epochs or 0.0) * updates_per_epoch)  # null: the caller resolves it (recipe)
    if cfg.name == "step":
        main = StepLR(optimizer, step_size=max(1, round(cfg.step_epochs * updates_per_epoch)), gamma=cfg.gamma)
    elif cfg.name == "cosine":
        main = CosineAnnealingLR(optimizer, T_max=max(1, total - warmup), eta_min=cfg.min_lr)
    elif cfg.name == "poly":
        main = PolynomialLR(optimizer, total_iters=max(1, total - warmup), power=cfg.power)
    else:
        main = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup == 0:
        return main
    ramp = LinearLR(optimizer, start_factor=cfg.warmup_start_factor, end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, main], milestones=[warmup])
