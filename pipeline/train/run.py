"""A training run's few objects, built from a configuration and the prepared data: the
accelerator, the batch layout, the model (prepared for DDP), optimizer, schedule, EMA, the input
and its device step, checkpoints, the preemption watch and the bad-sample policy.

    run = build_run(config, data)     # then trainer.fit(run)
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import torch
from accelerate import Accelerator
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from imaging.crops import eval_resize_for
from imaging.jpeg_region import native_status
from imaging.specs import CropSpec, PhotometricSpec
from pipeline.config import Config, ConfigError, load_config
from pipeline.data.device_augment import DeviceInput
from pipeline.data.prepared import PreparedData
from pipeline.data.webdataset_input import EvalStream, TrainStream, WebDatasetInput
from pipeline.models import build_model, use_torchvision_input
from pipeline.ops.launch import compilation, loader_workers, make_accelerator
from pipeline.ops.preemption import PreemptionWatch
from pipeline.ops.run_lock import RunLock
from pipeline.ops.stall_watch import StallWatch
from shards.store import is_remote, redact

from .bad_samples import BadSamples
from .checkpoint import CheckpointManager, save_plain_weights
from .fine_tune import freeze, load_start_weights
from .recipe import BatchLayout, build_optimizer, ema_decay, layout_for, scaled_lr, scaling_warnings, warmup_epochs
from .saved_runs import CONFIG_FILE
from .schedule import build_scheduler


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""

    step: int = 0  # updates done; each consumed its batches, also when fp16's GradScaler skipped it
    skipped_steps: int = 0  # of those, updates not applied (inf/nan gradients in fp16), nor averaged
    best: dict[str, float] = field(default_factory=dict)  # best validation top-1 error: model, ema


@dataclass
class Run:
    config: Config
    data: PreparedData
    accelerator: Accelerator
    layout: BatchLayout
    lr: float  # optim.lr scaled to the real batch
    model: torch.nn.Module  # prepared (DDP)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: AveragedModel | None
    ema_decay: float | None
    warmup_epochs: float  # schedule.warmup_epochs, or the one the batch needs where it is null
    input: object  # WebDataset-, FFCV-, Memory- or DaliInput: train_batches(epoch, start_batch), val_batches()
    device_input: DeviceInput  # loader batches -> network inputs (distorted there unless off or done in workers)
    checkpoints: CheckpointManager
    preemption: PreemptionWatch
    stall_watch: StallWatch  # beaten at every step and validation batch; watching while fit trains
    bad_samples: BadSamples
    progress: Progress = field(default_factory=Progress)
    lock: RunLock | None = None  # the main process's hold on the run directory, while fit runs
    loader_ran_out: int | None = None  # the epoch in which this process's loader ran short (the run then stops)

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir

    def bare_model(self) -> torch.nn.Module:
        """The model without DDP and torch.compile wrappers (for EMA, evaluation, checks)."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def log(self, message: str) -> None:
        if self.accelerator.is_main_process:
            self.log_any(message)

    @staticmethod
    def log_any(message: str) -> None:
        """A line from this process, whichever it is."""
        tqdm.write(message, file=sys.stderr)

    def layout_record(self) -> dict:
        """What fixes the sequence of batches and the schedule: a resume must not change it."""
        c, layout = self.config, self.layout
        return {"processes": layout.processes, "batch_size": layout.batch_size, "grad_accum": layout.grad_accum,
                "loader_workers": c.data.workers, "updates_per_epoch": layout.updates_per_epoch,
                "schedule": dataclasses.asdict(c.schedule), "seed": c.seed}


def build_network(config: Config, num_classes: int, class_ids: list[str] | None = None,
                  say: Callable[[str], None] = lambda line: None, resuming: bool = False) -> torch.nn.Module:
    """The model a run starts from, seeded, so that every process (and a test) builds the same
    weights: fresh, or from ``model.weights`` (resolving ``model.transform_input``), then frozen
    as ``model.freeze`` says; ``say`` gets the lines that tell what was loaded and frozen.
    ``class_ids``: the data's, to tell whether the weights' classifier fits (else the count does).
    ``resuming``: the run has a checkpoint, which replaces the start weights, so they are not read
    (they may be gone); their input convention is the one the run's config.yaml recorded."""
    torch.manual_seed(config.seed)
    model = build_model(config.model.name, num_classes, config.model.aux_logits, config.model.dropout)
    notes = []
    if config.model.weights and resuming:
        if config.model.transform_input is None and (config.run_dir / CONFIG_FILE).is_file():
            config.model.transform_input = load_config(config.run_dir / CONFIG_FILE).model.transform_input
        notes.append(f"model.weights: not read; the run resumes from its checkpoint ({config.model.weights} "
                     f"started it)")
    elif config.model.weights:
        notes.append(load_start_weights(model, config, class_ids))
    if config.model.transform_input:
        try:
            use_torchvision_input(model)
        except ValueError as exc:
            raise ConfigError(f"model.transform_input: {exc}") from exc
    config.model.transform_input = bool(config.model.transform_input)  # written into config.yaml as chosen
    notes.append(freeze(model, config.model.freeze))
    if config.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    for note in notes:
        if note:
            say(note)
    return model


def recorded_config(config: Config) -> tuple[Config, str | None]:
    """The configuration as the run directory records it (config.yaml, TensorBoard's config text,
    the trackers' parameters): ``data.dir`` without user:password@ or a query (a signed URL's).
    With a line to print when that changed it: how to give the credentials back."""
    url = urlsplit(config.data.dir or "")
    if not (is_remote(config.data.dir) and (url.username or url.password or url.query)):
        return config, None
    shown = redact(config.data.dir)
    return dataclasses.replace(config, data=dataclasses.replace(config.data, dir=shown)), (
        f"config.yaml records data.dir as {shown} without its credentials (user:password@, query); give the full "
        f"URL again to read the data: data.dir=URL to resume, --data URL to evaluate")


def build_run(config: Config, data: PreparedData) -> Run:
    c = config
    accelerator = make_accelerator(c, compile_model=c.model.compile)
    c.data.workers = loader_workers(c.data.workers, accelerator)  # resolved once: the batch order depends on it
    baked = data.augment_copies > 0
    if baked and data.augment_size != c.data.image_size:
        raise ConfigError(
            f"data.image_size: {c.data.image_size} but {data.directory} holds augmented copies of size "
            f"{data.augment_size}; set data.image_size={data.augment_size}"
        )
    # An epoch is one pass over the source images, also when each is baked K times.
    layout = layout_for(c, accelerator.num_processes, data.train_samples // max(1, data.augment_copies))
    layout.check(str(data.directory))
    lr = scaled_lr(c.optim, layout.images_per_update)
    if accelerator.is_main_process:
        for warning in scaling_warnings(c.optim, c.schedule, layout.images_per_update):
            tqdm.write(f"warning: {warning}", file=sys.stderr)

    say = (lambda line: tqdm.write(line, file=sys.stderr)) if accelerator.is_main_process else (lambda line: None)
    # Half the collective timeout: the main process waits meanwhile in a collective, which must not time out first.
    checkpoints = CheckpointManager(c.run_dir / "checkpoints", accelerator, c.train.keep_checkpoints,
                                    resume_wait_s=c.collective_timeout_s / 2)
    resuming = checkpoints.agreed_latest() is not None
    model = build_network(c, data.num_classes, [entry["id"] for entry in data.classes], say, resuming)
    # Not under fp16: with a fused optimizer the GradScaler lets it skip an overflowing update
    # inside its kernel, and step_was_skipped no longer tells (the EMA would average the skip).
    optimizer = build_optimizer(model, lr, c.optim, fused=c.train.mixed_precision != "fp16")
    # The scheduler stays out of prepare(): a prepared scheduler steps once per process per call.
    warmup = warmup_epochs(c.schedule, c.optim, layout.images_per_update)
    schedule = dataclasses.replace(c.schedule, warmup_epochs=warmup)
    scheduler = build_scheduler(optimizer, schedule, layout.updates_per_epoch)
    # DDP, then torch.compile of the DDP module where model.compile is on (make_accelerator).
    model, optimizer = accelerator.prepare(model, optimizer)
    save_plain_weights(accelerator)  # checkpoints hold the bare module's keys, compiled or not
    ema, decay = None, None
    if c.ema.enabled:  # of the bare module: one more model, not one more compilation
        decay = ema_decay(c.ema, layout.images_per_update, layout.epoch_images)
        bare = accelerator.unwrap_model(model, keep_torch_compile=False)
        # Its count beside the weights (torch's default is the CPU): update_ema reads nothing back.
        ema = AveragedModel(bare, device=accelerator.device, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    # Beside Accelerate's state, as plain data: its registered objects are unpickled as code.
    checkpoints.register(scheduler=scheduler, ema=ema)

    a = c.data.augment
    photometric = PhotometricSpec(
        *(tuple(r) if r else None for r in (a.brightness, a.contrast, a.saturation)), a.random_order, a.lighting_std
    )
    distort = not baked and (any((a.brightness, a.contrast, a.saturation)) or a.lighting_std > 0)
    # Batched on the GPU; without one, per image in the WebDataset loader workers, which run
    # in parallel (the same code, hence the same distribution, either way). FFCV's and DALI's
    # pipelines have no place for it, so there it is always batched in the training process.
    in_workers = (distort and accelerator.device.type == "cpu" and data.format == "webdataset"
                  and c.data.loader == "webdataset")
    run_input = make_input(c, data, accelerator, layout, photometric if in_workers else None)
    return Run(
        config=c, data=data, accelerator=accelerator, layout=layout, lr=lr, model=model, optimizer=optimizer,
        scheduler=scheduler, ema=ema, ema_decay=decay, warmup_epochs=schedule.warmup_epochs, input=run_input,
        device_input=DeviceInput(accelerator.device, channels_last=c.model.channels_last,
                                 mixed_precision=c.train.mixed_precision,
                                 photometric=photometric if distort and not in_workers else None,
                                 compile_mode=c.model.compile_mode if c.model.compile else None,
                                 compile_backend=c.model.compile_backend),
        checkpoints=checkpoints,
        preemption=PreemptionWatch().install(),
        stall_watch=StallWatch(c.collective_timeout_s, f"process {accelerator.process_index}",
                               alone=accelerator.num_processes == 1),
        bad_samples=BadSamples(c.data.on_bad_sample, c.data.max_skipped_fraction, layout.epoch_images,
                               data.directory, c.run_dir),
    )


def make_input(c: Config, data: PreparedData, accelerator: Accelerator, layout: BatchLayout,
               photometric_in_workers: PhotometricSpec | None):
    a = c.data.augment
    crop = CropSpec(tuple(a.crop_area), tuple(a.crop_ratio), tuple(a.interpolations), a.flip) if a.crop else None
    eval_resize = eval_resize_for(c.data.image_size, c.data.eval_resize)
    eval_batch_size = c.data.eval_batch_size or 2 * c.data.batch_size
    rank, world = accelerator.process_index, accelerator.num_processes
    if c.data.loader == "memory":
        from pipeline.data.memory_input import MemoryInput

        return MemoryInput(data, batch_size=c.data.batch_size, eval_batch_size=eval_batch_size,
                           batches_per_epoch=layout.batches_per_epoch, rank=rank, world_size=world, seed=c.seed,
                           image_size=c.data.image_size, eval_resize=eval_resize, crop=crop,
                           device=accelerator.device, workers=c.data.workers)
    if data.format == "ffcv":
        from pipeline.data.ffcv_input import FFCVInput

        if accelerator.is_main_process:
            tqdm.write("data.format ffcv: crops are resized with OpenCV's INTER_AREA; "
                       "data.augment.interpolations does not apply (see docs/ffcv.md)", file=sys.stderr)
        return FFCVInput(
            data, batch_size=c.data.batch_size, eval_batch_size=eval_batch_size,
            batches_per_epoch=layout.batches_per_epoch, rank=rank, world_size=world,
            seed=c.seed, workers=c.data.workers, image_size=c.data.image_size, eval_resize=eval_resize,
            crop_area=crop.area if crop else None, crop_ratio=tuple(a.crop_ratio),
            flip=crop is not None and crop.flip, os_cache=c.data.ffcv_os_cache,
        )
    train = TrainStream(
        data.train, batch_size=c.data.batch_size, batches_per_epoch=layout.batches_per_epoch, rank=rank,
        world_size=world, seed=c.seed, image_size=c.data.image_size, crop=crop, baked=data.augment_copies > 0,
        shuffle_buffer=c.data.shuffle_buffer, eval_resize=eval_resize, photometric=photometric_in_workers,
        interleave_shards=c.data.interleave_shards, num_classes=data.num_classes,
    )
    if c.data.loader == "dali":  # the same samples and crops, decoded by DALI (photometric: DeviceInput's)
        from pipeline.data.dali_input import DaliInput

        return DaliInput(train, data.val, eval_batch_size=eval_batch_size, eval_resize=eval_resize,
                         workers=c.data.workers, device=accelerator.device,
                         hw_decoder_load=c.data.dali_hw_decoder_load)
    train.open_ahead_until = c.schedule.epochs - 1  # the loader's workers persist over the epochs
    val = EvalStream(data.val, batch_size=eval_batch_size, rank=rank, world_size=world,
                     image_size=c.data.image_size, resize=eval_resize, num_classes=data.num_classes)
    return WebDatasetInput(train, val, c.data.workers, accelerator.device.type == "cuda")


def describe(run: Run) -> str:
    c, layout, acc, data = run.config, run.layout, run.accelerator, run.data
    lr = (f"lr {run.lr:.6g} (optim.lr {c.optim.lr:g} at {c.optim.lr_base_batch} images, {c.optim.lr_scaling} "
          f"scaling to {layout.images_per_update})")
    if run.warmup_epochs:
        chosen = " (chosen for the batch)" if c.schedule.warmup_epochs is None else ""
        lr += f" after {run.warmup_epochs:g} warm-up epoch{'s' if run.warmup_epochs != 1 else ''}{chosen}"
    compiled = f", {note}" if (note := compilation(c)) else ""  # only the recipe decides
    processes = f"{acc.num_processes} process{'es' if acc.num_processes != 1 else ''}"
    threads = (f" ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''} each)"
               if acc.device.type == "cpu" else "")  # its share of the usable CPUs (pipeline.ops.launch)
    ema = (f", EMA decay {run.ema_decay:.6f} per update (horizon {c.ema.horizon_epochs:g} epochs"
           f"{', warmed up' if c.ema.warmup else ''})" if run.ema else "")
    return (f"{c.model.name}: {data.train_samples} training / {data.val_samples} validation images, "
            f"{data.num_classes} classes, {processes} on {acc.device.type}{threads}{compiled}, "
            f"{layout.updates_per_epoch} updates per epoch of {layout.images_per_update} images, "
            f"{layout.total_updates} updates in all, {lr}{ema}"
            # the shard loader's decoding: a Pillow fallback is 2-3x slower, say so
            + (f"\n{native_status()}" if data.format == "webdataset" and c.data.loader == "webdataset" else "")
            + (f"\n{run.input.describe()}" if c.data.loader == "dali" else "")
            + (f"\n{data.remote.describe()}" if data.remote is not None else ""))
