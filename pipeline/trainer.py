"""The training loop: Accelerate DDP, device-side augmentation, exact evaluation, resumption."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from data_prep import augment
from data_prep.manifest import PrepError

from . import tracking
from .checkpoint import CheckpointManager
from .config import Config, ConfigError, dump
from .data import EvalStream, PreparedData, TrainStream, WebDatasetInput, eval_resize_for, mix_seed, open_prepared
from .metrics import Tally
from .models import build_model, forward_with_aux, load_torchvision_weights
from .preemption import PreemptionWatch
from .run_files import write_classes
from .schedule import build_scheduler


class LaunchError(RuntimeError):
    """The processes did not form the group the launcher asked for."""


class Preempted(Exception):
    """The job was told to stop; a checkpoint of the current step has been written."""


def make_accelerator(config: Config) -> Accelerator:
    if config.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on CPU")
    # Without cpu=True on a host without CUDA, Accelerate starts independent single-process runs
    # instead of one gloo group; on CUDA hosts, the launcher's settings apply as usual.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.train.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(config.run_dir), logging_dir=str(config.run_dir)),
    )
    if accelerator.device.type == "cpu":
        # accelerate launch sets OMP_NUM_THREADS=1 unless told otherwise; on a CPU-only host
        # give each process its share of the cores instead (1.4x faster for the demo on 2 cores).
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_processes))
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise LaunchError(
            f"the launcher started {expected} processes but they formed a group of "
            f"{accelerator.num_processes}; refusing to train as independent copies"
        )
    return accelerator


def _param_groups(model: torch.nn.Module, weight_decay: float, decay_bias_and_norm: bool) -> list[dict]:
    if decay_bias_and_norm:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)  # biases and norm scales/shifts
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""

    step: int = 0  # optimizer updates done
    best_val_top1_error: float | None = None


class Trainer:
    def __init__(self, config: Config, data: PreparedData):
        self.config = config
        self.data = data
        self.accelerator = make_accelerator(config)
        acc, c = self.accelerator, config
        self.run_dir = config.run_dir
        self.baked = data.augment_copies > 0
        if self.baked and data.augment_size != c.data.image_size:
            raise ConfigError(
                f"data.image_size: {c.data.image_size} but {data.directory} holds augmented copies of size "
                f"{data.augment_size}; set data.image_size={data.augment_size}"
            )
        self.batch_size = c.data.batch_size
        self.accum = c.optim.grad_accum
        per_update = self.batch_size * acc.num_processes * self.accum
        # An epoch is one pass over the source images, also when each is baked K times.
        self.epoch_samples = data.train_samples // max(1, data.augment_copies)
        self.updates_per_epoch = self.epoch_samples // per_update
        if self.updates_per_epoch < 1:
            raise ConfigError(
                f"data.batch_size: {self.batch_size} x {acc.num_processes} processes x {self.accum} accumulation "
                f"exceeds the {self.epoch_samples} training images in {data.directory}"
            )
        self.batches_per_epoch = self.updates_per_epoch * self.accum
        self.total_updates = c.schedule.epochs * self.updates_per_epoch
        if c.train.max_steps:
            self.total_updates = min(self.total_updates, c.train.max_steps)

        torch.manual_seed(c.seed)  # identical initial weights on every process
        model = build_model(c.model.name, data.num_classes, c.model.aux_logits, c.model.dropout)
        if c.model.weights:
            try:
                load_torchvision_weights(model, c.model.weights)
            except ValueError as exc:
                raise ConfigError(f"model.weights: {exc}") from exc
        if c.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(
            _param_groups(model, c.optim.weight_decay, c.optim.decay_bias_and_norm),
            lr=c.optim.lr, momentum=c.optim.momentum, nesterov=c.optim.nesterov,
        )
        # The scheduler stays out of prepare(): a prepared scheduler steps once per process per call.
        self.scheduler = build_scheduler(optimizer, c.schedule, self.updates_per_epoch)
        if c.model.compile:  # before prepare, so that DDP wraps the compiled module (no_sync works)
            model = torch.compile(model)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(self.scheduler)
        self.ema = None
        if c.ema.enabled:
            self.ema = AveragedModel(self._bare_model(), multi_avg_fn=get_ema_multi_avg_fn(c.ema.decay), use_buffers=True)
            acc.register_for_checkpointing(self.ema)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", acc, c.train.keep_checkpoints)
        self.progress = Progress()
        self.preemption = PreemptionWatch().install()

        a = c.data.augment
        crop = augment.CropSpec(tuple(a.crop_area), tuple(a.crop_ratio), tuple(a.interpolations), a.flip) if a.crop else None
        self.photometric = augment.PhotometricSpec(
            *(tuple(r) if r else None for r in (a.brightness, a.contrast, a.saturation)), a.random_order, a.lighting_std
        )
        distort = not self.baked and (any((a.brightness, a.contrast, a.saturation)) or a.lighting_std > 0)
        # Batched on the GPU; without one, per image in the WebDataset loader workers, which run
        # in parallel (the same code, hence the same distribution, either way). FFCV's pipeline
        # has no place for it, so there it is always batched in the training process.
        in_workers = distort and acc.device.type == "cpu" and data.format == "webdataset"
        self.photometric_on = distort and not in_workers
        self.input = self._make_input(crop, self.photometric if in_workers else None)

    def _make_input(self, crop: augment.CropSpec | None, photometric: augment.PhotometricSpec | None):
        c, acc, data = self.config, self.accelerator, self.data
        eval_resize = eval_resize_for(c.data.image_size, c.data.eval_resize)
        eval_batch_size = c.data.eval_batch_size or 2 * self.batch_size
        if data.format == "ffcv":
            from .ffcv_data import FFCVInput

            self.log("data.format ffcv: crops are resized with OpenCV's INTER_AREA; "
                     "data.augment.interpolations does not apply (see README, FFCV)")
            return FFCVInput(
                data, batch_size=self.batch_size, eval_batch_size=eval_batch_size,
                batches_per_epoch=self.batches_per_epoch, rank=acc.process_index, world_size=acc.num_processes,
                seed=c.seed, workers=c.data.workers, image_size=c.data.image_size, eval_resize=eval_resize,
                crop_area=crop.area if crop else None, crop_ratio=tuple(c.data.augment.crop_ratio),
                flip=crop is not None and crop.flip, os_cache=c.data.ffcv_os_cache,
            )
        train = TrainStream(
            data.train, batch_size=self.batch_size, batches_per_epoch=self.batches_per_epoch, rank=acc.process_index,
            world_size=acc.num_processes, seed=c.seed, image_size=c.data.image_size, crop=crop, baked=self.baked,
            shuffle_buffer=c.data.shuffle_buffer, eval_resize=eval_resize, photometric=photometric,
        )
        val = EvalStream(
            data.val, batch_size=eval_batch_size, rank=acc.process_index,
            world_size=acc.num_processes, image_size=c.data.image_size, resize=eval_resize,
        )
        return WebDatasetInput(train, val, c.data.workers, acc.device.type == "cuda")

    # ----------------------------------------------------------------------------- helpers
    def _bare_model(self) -> torch.nn.Module:
        """The model without DDP and torch.compile wrappers (for EMA, evaluation, checks)."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _layout(self) -> dict:
        """What fixes the sequence of batches and the schedule: a resume must not change it."""
        c = self.config
        return {"processes": self.accelerator.num_processes, "batch_size": self.batch_size, "grad_accum": self.accum,
                "loader_workers": c.data.workers, "updates_per_epoch": self.updates_per_epoch,
                "schedule": dataclasses.asdict(c.schedule), "seed": c.seed}

    def log(self, message: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(message, file=sys.stderr)

    def _prepare_inputs(self, images: torch.Tensor, step: int) -> torch.Tensor:
        """uint8 batch from the loader -> distorted, normalised float batch on the device."""
        images = images.to(self.accelerator.device, non_blocking=True)
        if self.photometric_on:
            generator = torch.Generator().manual_seed(mix_seed(self.config.seed, step, self.accelerator.process_index, "photo"))
            images = augment.photometric_distort(images, self.photometric, generator)
        else:
            images = images.float().div_(255)
        images = augment.normalize(images)
        if self.config.model.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Total loss (main + aux_weight x each auxiliary head), main logits, [main, aux...] losses."""
        out = forward_with_aux(self.model, images)
        smoothing = self.config.optim.label_smoothing
        losses = [F.cross_entropy(x.float(), labels, label_smoothing=smoothing) for x in (out.logits, *out.aux)]
        total = losses[0] + self.config.model.aux_weight * sum(losses[1:]) if len(losses) > 1 else losses[0]
        return total, out.logits, torch.stack(losses).detach()

    # ----------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, models: list[torch.nn.Module]) -> list[dict[str, float]]:
        """Exact top-1/top-5 error of each model over the whole validation set, in any number of
        processes; one decoding pass serves all the models (the trained one and its EMA)."""
        acc = self.accelerator
        modes = [m.training for m in models]
        for model in models:
            model.eval()
        tallies = [Tally() for _ in models]
        for images, labels in self.input.val_batches():
            inputs = augment.normalize(images.to(acc.device, non_blocking=True).float().div_(255))
            if self.config.model.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            labels = labels.to(acc.device)
            for model, tally in zip(models, tallies):
                with acc.autocast():
                    logits = forward_with_aux(model, inputs).logits.float()
                tally.add(logits, labels, F.cross_entropy(logits, labels, reduction="sum"))
        for model, mode in zip(models, modes):
            model.train(mode)
        results = []
        for tally in tallies:
            total = tally.reduce(acc)
            if total.count != self.data.val_samples:
                raise RuntimeError(
                    f"validation counted {total.count} samples, the manifest of {self.data.directory} says "
                    f"{self.data.val_samples}"
                )
            results.append({**total.errors(), "count": total.count})
        return results

    def _sync_buffers(self) -> None:
        """DDP broadcasts buffers at each forward, so after the last step every rank's batch-norm
        statistics include its own batch: take rank 0's everywhere before evaluating or saving."""
        if self.accelerator.num_processes > 1:
            for buffer in self._bare_model().buffers():
                torch.distributed.broadcast(buffer, src=0)

    # ----------------------------------------------------------------------------- checkpoints
    def _save(self) -> Path:
        state = {"step": self.progress.step, "best_val_top1_error": self.progress.best_val_top1_error,
                 "layout": self._layout()}
        return self.checkpoints.save(self.progress.step, state)

    def _resume(self) -> None:
        latest = self.checkpoints.latest()
        if latest is None:
            return
        saved = self.checkpoints.state(latest).get("layout", {})
        changed = {k: (saved.get(k), v) for k, v in self._layout().items() if saved.get(k) != v}
        if changed:
            detail = "; ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
            raise ConfigError(
                f"{latest} was written with another batch layout or schedule ({detail}); resuming would "
                f"not replay the same batches and learning rates. Use the original settings, or a new name=..."
            )
        state = self.checkpoints.load(latest)
        self.progress = Progress(state["step"], state["best_val_top1_error"])
        self.log(f"resumed from {latest} (step {self.progress.step})")

    # ----------------------------------------------------------------------------- training
    def train(self) -> dict:
        acc, c = self.accelerator, self.config
        started = time.perf_counter()
        if acc.is_main_process:
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        self._resume()  # before config.yaml is rewritten: a refused resume keeps the original
        if acc.is_main_process:
            (self.run_dir / "config.yaml").write_text(dump(c))
            write_classes(self.run_dir, self.data.classes)  # for evaluation and prediction
        tracking.start_tracking(acc, self.run_dir, self.progress.step, dump(c))
        tracker = acc.get_tracker("tensorboard") if acc.is_main_process else None
        self.log(
            f"{c.model.name}: {self.data.train_samples} training / {self.data.val_samples} validation images, "
            f"{self.data.num_classes} classes, {acc.num_processes} processes on {acc.device.type}, "
            f"{self.updates_per_epoch} updates per epoch of {self.batch_size * acc.num_processes * self.accum} images, "
            f"{self.total_updates} updates in all"
        )
        last_record: dict = {}
        self.model.train()
        try:
            while self.progress.step < self.total_updates:
                epoch = self.progress.step // self.updates_per_epoch
                last_record = self._train_epoch(epoch, tracker) or last_record
                if self.progress.step < self.total_updates and self.preemption.should_stop(acc):
                    raise Preempted()  # _end_epoch has just written the checkpoint
        except Preempted:
            outcome = self.preemption.requeue() if acc.is_main_process else ""
            self.log(f"stopped at step {self.progress.step} on request, checkpoint written; {outcome}")
            acc.end_training()
            return {"preempted_at_step": self.progress.step}
        self._sync_buffers()
        self._check_replicas()
        result = (f", validation top-1/top-5 error {last_record['val_top1_error']:.3f}/{last_record['val_top5_error']:.3f}"
                  if "val_top1_error" in last_record else "")
        self.log(f"done in {time.perf_counter() - started:.0f}s{result}. "
                 f"TensorBoard: tensorboard --logdir {self.run_dir / tracking.TRACKER_DIR}")
        acc.end_training()
        return last_record

    def _check_replicas(self) -> None:
        """DDP keeps the replicas identical; prove it at the end rather than trust it."""
        acc = self.accelerator
        bare = self._bare_model()
        params = [t.detach().double().flatten() for t in (*bare.parameters(), *bare.buffers()) if t.is_floating_point()]
        flat = torch.cat(params)
        checksum = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)).sum()])
        sums = acc.gather(checksum[None]).cpu()
        if not torch.equal(sums, sums[:1].expand_as(sums)):
            raise RuntimeError(f"model replicas differ across processes: checksums {sums.tolist()}")
        self.log(f"parameters identical on all {acc.num_processes} processes")

    def _train_epoch(self, epoch: int, tracker) -> dict | None:
        acc, c = self.accelerator, self.config
        start_update = self.progress.step - epoch * self.updates_per_epoch
        end_update = min(self.updates_per_epoch, self.total_updates - epoch * self.updates_per_epoch)
        loader = self.input.train_batches(epoch, start_update * self.accum)
        epoch_tally, window_tally = Tally(), Tally()
        window = _Window()
        epoch_start = time.perf_counter()
        epoch_images = 0
        bar = tqdm(total=end_update, initial=start_update, desc=f"epoch {epoch + 1}/{c.schedule.epochs}",
                   disable=not acc.is_main_process, leave=False, file=sys.stderr, dynamic_ncols=True)
        grid_logged = False
        for update in range(start_update, end_update):
            step = self.progress.step
            for micro in range(self.accum):
                wait_start = time.perf_counter()
                batch = next(loader, None)
                if batch is None:
                    raise RuntimeError(
                        f"epoch {epoch + 1}: the loader of process {acc.process_index} ran out of samples; "
                        f"do the shards in {self.data.directory} hold what the manifest says? "
                        f"(python -m data_prep verify {self.data.directory})"
                    )
                images, labels = batch
                window.wait += time.perf_counter() - wait_start
                torch.manual_seed(mix_seed(c.seed, step, micro, acc.process_index))  # dropout, resumable
                inputs = self._prepare_inputs(images, step * self.accum + micro)
                labels = labels.to(acc.device, non_blocking=True)
                if c.train.image_grid and not grid_logged:
                    tracking.log_image_grid(acc, inputs, step + 1)  # the step this batch trains
                    grid_logged = True
                last_micro = micro == self.accum - 1
                with (contextlib.nullcontext() if last_micro else acc.no_sync(self.model)), acc.autocast():
                    loss, logits, losses = self._loss(inputs, labels)
                acc.backward(loss / self.accum)
                batch_n = labels.numel()
                for tally in (epoch_tally, window_tally):
                    tally.add(logits.detach().float(), labels, losses[0] * batch_n)
                window.add(losses, batch_n)
                epoch_images += batch_n
            if c.optim.clip_grad_norm:
                acc.clip_grad_norm_(self.model.parameters(), c.optim.clip_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if not self.optimizer.step_was_skipped:  # fp16: GradScaler skipped an overflowing step
                self.scheduler.step()
            self.progress.step += 1
            if self.ema is not None and self.progress.step % c.ema.every == 0:
                self.ema.update_parameters(self._bare_model())
            bar.update(1)
            if self.progress.step % c.train.log_every_steps == 0 or update == end_update - 1:
                self._log_window(window, window_tally, tracker, bar)
                window_tally, window = Tally(), _Window()
            every = c.train.checkpoint_every_steps
            saved = every and self.progress.step % every == 0 and update != self.updates_per_epoch - 1
            if saved:
                self._save()
            last_of_epoch = update == end_update - 1  # then _end_epoch evaluates and saves first
            if not last_of_epoch and self.preemption.should_stop(acc):  # same answer on every rank
                bar.close()
                if not saved:
                    self._save()
                raise Preempted()
        bar.close()
        epoch_done = end_update == self.updates_per_epoch  # else the run ends mid-epoch (max_steps)
        return self._end_epoch(epoch, epoch_tally, epoch_images / (time.perf_counter() - epoch_start), epoch_done)

    def _log_window(self, window: "_Window", tally: Tally, tracker, bar) -> None:
        acc = self.accelerator
        elapsed = time.perf_counter() - window.start
        errors = tally.reduce(acc).errors()
        values = {
            "train/loss": errors["loss"],
            "train/top1_error": errors["top1_error"],
            "train/top5_error": errors["top5_error"],
            "lr": self.scheduler.get_last_lr()[0],
            "throughput/images_per_sec": window.images * acc.num_processes / max(elapsed, 1e-9),
            "throughput/data_wait_fraction": window.wait / max(elapsed, 1e-9),
        }
        aux = window.mean_losses()[1:]
        for i, value in enumerate(aux, start=1):
            values[f"train/loss_aux{i}"] = value
        if acc.device.type == "cuda":
            values["memory/peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if tracker is not None:
            tracker.log(values, step=self.progress.step)
            bar.set_postfix(loss=f"{errors['loss']:.3f}", err=f"{errors['top1_error']:.3f}",
                            ips=f"{values['throughput/images_per_sec']:.0f}")

    def _end_epoch(self, epoch: int, tally: Tally, images_per_sec: float, epoch_done: bool) -> dict:
        acc, c = self.accelerator, self.config
        step = self.progress.step
        final = step >= self.total_updates
        record = {"epoch": epoch + 1 if epoch_done else epoch + step % self.updates_per_epoch / self.updates_per_epoch,
                  "step": step}
        if (epoch + 1) % c.train.eval_every_epochs == 0 or final:
            train = tally.reduce(acc).errors()
            self._sync_buffers()
            models = [self._bare_model()] + ([self.ema.module] if self.ema is not None else [])
            val, *averaged = self.evaluate(models)
            record.update({
                "train_top1_error": train["top1_error"], "train_top5_error": train["top5_error"],
                "train_loss": train["loss"], "val_top1_error": val["top1_error"], "val_top5_error": val["top5_error"],
                "val_loss": val["loss"], "val_samples": val["count"],
                "images_per_sec": images_per_sec * acc.num_processes,
            })
            values = {"val/top1_error": val["top1_error"], "val/top5_error": val["top5_error"], "val/loss": val["loss"]}
            if averaged:
                ema = averaged[0]
                record.update({"ema_val_top1_error": ema["top1_error"], "ema_val_top5_error": ema["top5_error"]})
                values.update({"val_ema/top1_error": ema["top1_error"], "val_ema/top5_error": ema["top5_error"]})
            if acc.is_main_process:
                acc.get_tracker("tensorboard").log(values, step=step)
            tracking.append_metrics(acc, self.run_dir, record)
            self.log(
                f"epoch {record['epoch']:g}: step {step}, train loss {train['loss']:.3f}, "
                f"train top-1 error {train['top1_error']:.3f}, val top-1/top-5 error "
                f"{val['top1_error']:.3f}/{val['top5_error']:.3f}"
                + (f" (EMA {record['ema_val_top1_error']:.3f}/{record['ema_val_top5_error']:.3f})" if self.ema else "")
                + f", {record['images_per_sec']:.0f} img/s"
            )
            best = self.progress.best_val_top1_error
            is_best = best is None or val["top1_error"] < best
            if is_best:
                self.progress.best_val_top1_error = val["top1_error"]
            path = self._save()
            if is_best:
                self.checkpoints.mark_best(path, val["top1_error"], step)
        else:
            self._save()
        return record


class _Window:
    """What happened since the last log line (this process only; errors come from a Tally)."""

    def __init__(self):
        self.start, self.wait, self.images, self.batches = time.perf_counter(), 0.0, 0, 0
        self.loss_sums: torch.Tensor | None = None

    def add(self, losses: torch.Tensor, images: int) -> None:
        self.loss_sums = losses if self.loss_sums is None else self.loss_sums + losses
        self.images += images
        self.batches += 1

    def mean_losses(self) -> list[float]:
        return [] if self.loss_sums is None else (self.loss_sums / self.batches).tolist()


def run(config: Config) -> dict:
    if config.data.format == "ffcv":
        from .ffcv_data import require_ffcv

        require_ffcv()  # before any data is prepared or opened
    if config.data.dir is None:
        directory = _prepare_demo_once(Path(config.data.demo_root), config.data.format)
    else:
        directory = Path(config.data.dir)
    try:
        data = open_prepared(directory)
    except PrepError as exc:
        raise ConfigError(f"data.dir: {exc}") from exc
    if data.format != config.data.format:
        raise ConfigError(
            f"data.format: {config.data.format}, but {directory / 'manifest.json'} describes {data.format} files "
            f"(set data.format={data.format}, or prepare them with 'python -m data_prep {'ffcv' if config.data.format == 'ffcv' else 'shards'}')"
        )
    return Trainer(config, data).train()


def _prepare_demo_once(root: Path, data_format: str) -> Path:
    """The demo data, prepared by the first process while the others wait for it (the
    process group does not exist yet, so they watch for the manifest on the shared disk)."""
    from data_prep.demo import ensure_demo, ensure_demo_ffcv
    from data_prep.manifest import MANIFEST

    directory = root / ("ffcv" if data_format == "ffcv" else "shards")
    if int(os.environ.get("RANK", "0")) == 0:
        return ensure_demo_ffcv(root) if data_format == "ffcv" else ensure_demo(root)
    deadline = time.monotonic() + 1800
    while not (directory / MANIFEST).is_file():
        if time.monotonic() > deadline:
            raise PrepError(f"{directory}: rank 0 did not prepare the demo data within 30 minutes (shared disk?)")
        time.sleep(1)
    return directory
