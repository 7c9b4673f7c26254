"""A recipe at a given scale: the batch layout, the learning rate and the EMA decay it implies.

A recipe states its learning rate at a reference batch (``optim.lr`` at ``optim.lr_base_batch``
images per update, as timm's ``lr_base``/``lr_base_size``) and its Polyak average as a horizon
in epochs. Both are turned into per-update numbers here from the real batch (processes x
per-process batch x accumulation), so the same recipe means the same training on 1 GPU, 8
GPUs or 4 nodes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.config import Config, ConfigError, EmaConfig, OptimConfig, ScheduleConfig
from pipeline.models import classifier_layers


@dataclass(frozen=True)
class BatchLayout:
    """How an epoch is cut into updates; every rank takes the same number of full batches."""

    processes: int
    batch_size: int  # per process and micro-batch
    grad_accum: int
    epoch_images: int  # one pass over the source images (baked copies counted once)
    epochs: int
    max_steps: int | None = None

    @property
    def images_per_update(self) -> int:
        return self.processes * self.batch_size * self.grad_accum

    @property
    def updates_per_epoch(self) -> int:
        return self.epoch_images // self.images_per_update  # the remainder of each epoch is dropped

    @property
    def batches_per_epoch(self) -> int:
        """Per process: micro-batches, ``grad_accum`` to an update."""
        return self.updates_per_epoch * self.grad_accum

    @property
    def total_updates(self) -> int:
        total = self.epochs * self.updates_per_epoch
        return min(total, self.max_steps) if self.max_steps else total

    def check(self, where: str) -> None:
        if self.updates_per_epoch < 1:
            raise ConfigError(
                f"data.batch_size: {self.batch_size} x {self.processes} processes x {self.grad_accum} accumulation "
                f"exceeds the {self.epoch_images} training images in {where}"
            )


def layout_for(config: Config, processes: int, epoch_images: int) -> BatchLayout:
    return BatchLayout(processes, config.data.batch_size, config.optim.grad_accum, epoch_images,
                       config.schedule.epochs, config.train.max_steps)


def lr_factor(optim: OptimConfig, images_per_update: int) -> float:
    """How much the real batch scales ``optim.lr``: linearly (Goyal et al. 2017), by the square
    root, or not at all."""
    ratio = images_per_update / optim.lr_base_batch
    return {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[optim.lr_scaling]


def scaled_lr(optim: OptimConfig, images_per_update: int) -> float:
    """``optim.lr`` is right for ``optim.lr_base_batch`` images per update; scaled to the real batch."""
    return optim.lr * lr_factor(optim, images_per_update)


# Goyal et al. 2017 warm up for 5 epochs whenever the lr is scaled up for a large batch; up to 2x
# the recipe's own batch (8 GPUs of a recipe stated for 4, say) the lr needs none.
AUTO_WARMUP_EPOCHS, AUTO_WARMUP_ABOVE_FACTOR = 5.0, 2.0


def warmup_epochs(schedule: ScheduleConfig, optim: OptimConfig, images_per_update: int) -> float:
    """``schedule.warmup_epochs``, or where it is null what the batch needs: none unless the lr
    is scaled up more than 2x, else Goyal et al.'s 5 epochs (at most a tenth of the run)."""
    if schedule.warmup_epochs is not None:
        return schedule.warmup_epochs
    if lr_factor(optim, images_per_update) <= AUTO_WARMUP_ABOVE_FACTOR:
        return 0.0
    return min(AUTO_WARMUP_EPOCHS, schedule.epochs / 10)


def scaling_warnings(optim: OptimConfig, schedule: ScheduleConfig, images_per_update: int) -> list[str]:
    """What a run at this batch does that the recipe's references do not support."""
    factor, lr = lr_factor(optim, images_per_update), scaled_lr(optim, images_per_update)
    warnings = []
    if optim.lr_max_batch is not None and images_per_update > optim.lr_max_batch:
        warnings.append(
            f"optim.lr: {images_per_update} images per update is beyond the {optim.lr_max_batch} that this recipe's "
            f"references trained at (optim.lr_max_batch); {optim.lr_scaling} scaling gives lr {lr:.4g}, which they "
            f"do not support: compare with a run at {optim.lr_max_batch} images, or use a smaller batch")
    if schedule.warmup_epochs == 0 and factor > AUTO_WARMUP_ABOVE_FACTOR:
        warnings.append(
            f"schedule.warmup_epochs: 0, but the lr is scaled {factor:.3g}x to {lr:.4g} for {images_per_update} images "
            f"per update; large batches need a warm-up (Goyal et al. 2017: 5 epochs); null chooses one")
    return warnings


def ema_decay(ema: EmaConfig, images_per_update: int, epoch_images: int) -> float:
    """The per-update decay whose time constant is ``ema.horizon_epochs`` epochs of images: after
    that many images, the weight of the average so far has fallen to 1/e, whatever the batch, the
    number of processes or ``ema.every``."""
    images_per_average = images_per_update * ema.every
    return math.exp(-images_per_average / (ema.horizon_epochs * epoch_images))


def _is_bias(name: str, param: torch.Tensor) -> bool:
    return name.endswith(".bias") or name == "bias"


def param_groups(model: torch.nn.Module, lr: float, optim: OptimConfig) -> list[dict]:
    """Weights; biases (at ``bias_lr_factor`` x lr, as Caffe's ``lr_mult: 2``); normalisation
    scales; then the classifier layers' weights and biases at ``head_lr_factor`` times those
    (``pipeline.models.classifier_layers``). Biases and norms are decayed only with
    ``decay_bias_and_norm``; frozen parameters are left out, and so are empty groups. Each group
    carries its ``lr_factor``, so that the scheduled lr can be read from any of them."""
    head = {id(p) for layer in classifier_layers(model).values() for p in layer.parameters()} \
        if optim.head_lr_factor != 1.0 else set()
    other_decay = optim.weight_decay if optim.decay_bias_and_norm else 0.0
    groups = {(part, kind): [] for part in ("body", "head") for kind in ("weights", "biases", "norms")}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "weights" if p.ndim > 1 else "biases" if _is_bias(name, p) else "norms"
        groups["head" if id(p) in head else "body", kind].append(p)
    built = []
    for (part, kind), params in groups.items():
        factor = (optim.head_lr_factor if part == "head" else 1.0) * (optim.bias_lr_factor if kind == "biases" else 1.0)
        built.append({"params": params, "lr": lr * factor, "lr_factor": factor,
                      "weight_decay": optim.weight_decay if kind == "weights" else other_decay})
    return [g for g in built if g["params"]]


def scheduled_lr(optimizer: torch.optim.Optimizer) -> float:
    """The lr the schedule is at now, without any group's factor (the one logged)."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_factor", 1.0)


def build_optimizer(model: torch.nn.Module, lr: float, optim: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    """SGD over ``param_groups``; ``fused``: one kernel for all parameters (CUDA and CPU),
    instead of torch's default of a few per parameter group."""
    return torch.optim.SGD(param_groups(model, lr, optim), lr=lr, momentum=optim.momentum, nesterov=optim.nesterov,
                           fused=fused or None)
