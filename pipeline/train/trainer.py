"""Training: build a run's few objects, then epochs of updates, validation and checkpoints.

    run = build_run(config, data)     # accelerator, batch layout, model, optimizer, schedule, EMA, input
    fit(run)                          # resume; then per epoch: train_one_epoch, end_epoch

The pieces live beside this file, one stage each: ``run`` (building those objects), ``recipe``
(batch layout, scaled lr, warm-up, EMA decay, parameter groups), ``schedule``, ``step`` (loss,
optimizer step), ``ema`` (the average's update), ``validate``, ``checkpoint`` (atomic saves, best,
resume), ``tracking`` (TensorBoard, metrics.jsonl) and ``trackers`` (every tracker of
``train.log_with``: TensorBoard, MLflow, W&B, Aim); loader batches become network inputs
in ``pipeline.data.device_augment``, stop signals are watched by ``pipeline.ops.preemption``,
a process that stops moving prints its stacks (``pipeline.ops.stall_watch``), and
``profiling`` times the phases of a few updates (``train.profile_steps``).

Within an update nothing is read back from the device, so the host runs ahead of it: counts
and losses are summed on the device until a log line, and the stop signals are agreed on by
an all-reduce read one poll later (``preemption``).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.config import Config, ConfigError, dump
from pipeline.data.prepared import IGNORE_LABEL, BadSampleError, RemoteOptions, mix_seed, open_prepared
from pipeline.ops.launch import on_every_rank
from pipeline.ops.preemption import REQUEUE
from pipeline.ops.run_lock import RunDirInUse, acquire
from shards.manifest import PrepError
from shards.store import StoreError, error_line

from . import tracking
from .checkpoint import resume_latest, write_classes
from .ema import sync_ema_buffers, update_ema
from .metrics import Tally
from .profiling import NO_PROFILE, StepProfiler
from .recipe import scheduled_lr
from .run import Progress, Run, build_run, describe, recorded_config
from .step import compute_loss, optimizer_step
from .trackers import open_trackers, require_installed
from .validate import validate


class Preempted(Exception):
    """The job was told to stop; a checkpoint of the current step has been written."""

    def __init__(self, asked: int):
        super().__init__(asked)
        self.requeue = asked == REQUEUE


# ----------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(run: Run) -> Path:
    p, acc = run.progress, run.accelerator
    lost = run.lock is not None and not run.lock.still_ours()
    lost, short = agree(run, lost)
    if lost:
        raise on_every_rank(RunDirInUse(run.run_dir, message=f"{run.run_dir}: another job took over the run "
                                        f"directory (see its run.lock); stopping without writing a checkpoint"))
    if short:
        raise short
    sync_ema_buffers(run.ema, acc)
    run.bad_samples.flush(acc)  # every record up to this step is written before the checkpoint
    state = {"step": p.step, "skipped_steps": p.skipped_steps, "best": p.best, "layout": run.layout_record(),
             **run.bad_samples.state()}
    return run.checkpoints.save(p.step, state, size_estimate=lambda: state_bytes(run))


def state_bytes(run: Run) -> int:
    """About what a checkpoint takes on disk: the model, the optimizer's state and the EMA."""
    tensors = [*run.bare_model().state_dict().values(),
               *(t for s in run.optimizer.state.values() for t in s.values() if torch.is_tensor(t))]
    if run.ema is not None:
        tensors += list(run.ema.state_dict().values())
    return sum(t.numel() * t.element_size() for t in tensors)


def resume(run: Run) -> None:
    found = resume_latest(run.checkpoints, run.layout_record())
    if found is not None:
        path, state = found
        run.progress = Progress(state["step"], state.get("skipped_steps", 0), state.get("best", {}))
        run.bad_samples.load_state(state)
        acc = run.accelerator  # each process says it: all load the checkpoint the main process chose
        who = f"process {acc.process_index}: " if acc.num_processes > 1 else ""
        run.log_any(f"{who}resumed from {path} (step {run.progress.step})")


def agree(run: Run, lost: bool) -> tuple[bool, Exception | None]:
    """Whether any process lost the run directory, and the error naming a process whose loader
    ran out of samples this epoch (None: none did); one all-reduce, the same answer everywhere."""
    acc = run.accelerator
    flags = torch.tensor([int(lost), acc.process_index + 1 if run.loader_ran_out else 0], device=acc.device)
    lost, short = acc.reduce(flags, reduction="max").tolist()
    if not short:
        return bool(lost), None
    where, epoch = run.data.directory, max(0, run.progress.step - 1) // run.layout.updates_per_epoch + 1
    return bool(lost), on_every_rank(BadSampleError(
        f"epoch {epoch}: the loader of process {short - 1} ran out of samples before the epoch's "
        f"{run.layout.batches_per_epoch} batches; do the shards in {where} hold what the manifest says? "
        f"(python -m data_prep verify {where})"))


def sync_buffers(run: Run) -> None:
    """DDP broadcasts buffers at each forward, so after the last step every rank's batch-norm
    statistics include its own batch: take rank 0's everywhere before evaluating or saving."""
    if run.accelerator.num_processes > 1:
        for buffer in run.bare_model().buffers():
            torch.distributed.broadcast(buffer, src=0)
    sync_ema_buffers(run.ema, run.accelerator)


def check_replicas(run: Run) -> None:
    """DDP keeps the replicas identical, and sync_buffers the EMAs; prove it at the end rather than trust it."""
    acc = run.accelerator
    models = {"model": run.bare_model()} | ({"EMA": run.ema.module} if run.ema is not None else {})
    for name, model in models.items():
        flat = torch.cat([t.detach().double().flatten() for t in (*model.parameters(), *model.buffers())
                          if t.is_floating_point()])
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
        sums = acc.gather(torch.stack([flat.sum(), (flat * weights).sum()])[None]).cpu()
        if not torch.equal(sums, sums[:1].expand_as(sums)):
            raise RuntimeError(f"{name} replicas differ across processes: checksums {sums.tolist()}")
    run.log(f"parameters identical on all {acc.num_processes} processes"
            + (" (model and EMA, with their buffers)" if run.ema is not None else ""))


# ----------------------------------------------------------------------------------------- the loop
def train_one_epoch(run: Run, epoch: int, tracker, profiler: StepProfiler = NO_PROFILE) -> dict:
    acc, c, layout, progress = run.accelerator, run.config, run.layout, run.progress
    accum = layout.grad_accum
    start_update = progress.step - epoch * layout.updates_per_epoch
    end_update = min(layout.updates_per_epoch, layout.total_updates - epoch * layout.updates_per_epoch)
    batches = EpochBatches(run.input.train_batches(epoch, start_update * accum), run, epoch)
    if start_update == 0:
        run.bad_samples.new_epoch()
    epoch_tally, window = Tally(), tracking.LogWindow()
    epoch_start, epoch_images, epoch_wait = time.perf_counter(), 0, 0.0
    grid_logged = not c.train.image_grid
    # The bar is closed on any exit, so that an error line is not drawn over.
    with tqdm(total=end_update, initial=start_update, desc=f"epoch {epoch + 1}/{c.schedule.epochs}",
              disable=not acc.is_main_process, leave=False, file=sys.stderr, dynamic_ncols=True) as bar, profiler:
        for update in range(start_update, end_update):
            step = progress.step
            for micro in range(accum):
                wait_start = time.perf_counter()
                with profiler.region("data wait"):
                    images, labels, skipped = batches.next()
                waited = time.perf_counter() - wait_start
                window.data_wait += waited
                epoch_wait += waited
                if skipped:  # the slots carry no label; the policy is applied after the update
                    run.bad_samples.add(skipped, step=step + 1, epoch=epoch, rank=acc.process_index)
                torch.manual_seed(mix_seed(c.seed, step, micro, acc.process_index))  # dropout, resumable
                generator = (torch.Generator().manual_seed(mix_seed(c.seed, step * accum + micro, acc.process_index, "photo"))
                             if run.device_input.photometric else None)
                with profiler.region("host-to-device"):  # and the input's transform there
                    inputs = run.device_input(images, generator)
                    labels = labels.to(acc.device, non_blocking=True)
                if not grid_logged:
                    tracking.log_image_grid(acc, inputs, step + 1)  # the step this batch trains
                    grid_logged = True
                # Gradients are all-reduced once per update, on its last micro-batch.
                sync = contextlib.nullcontext() if micro == accum - 1 else acc.no_sync(run.model)
                with sync, acc.autocast(), profiler.region("forward"):
                    loss, logits, losses = compute_loss(run.model, inputs, labels, c.model.aux_weight,
                                                        c.optim.label_smoothing)
                with profiler.region("backward"):
                    acc.backward(loss / accum)
                labelled = labels.ne(IGNORE_LABEL).sum()
                counts = Tally.counts(logits.detach().float(), labels, losses[0] * labelled)  # once, for both
                epoch_tally.add_counts(counts)
                window.add(counts, losses, labels.numel())
                epoch_images += labels.numel()
            with profiler.region("optimizer"):
                applied = optimizer_step(acc, run.model, run.optimizer, run.scheduler, c.optim.clip_grad_norm)
            progress.step += 1
            progress.skipped_steps += not applied
            if run.ema is not None and applied and progress.step % c.ema.every == 0:
                with profiler.region("ema"):
                    update_ema(run.ema, run.bare_model(), run.ema_decay, c.ema.warmup)
            bar.update(1)
            run.stall_watch.beat()

            last_of_epoch = update == end_update - 1  # then end_epoch evaluates and saves
            if progress.step % c.train.log_every_steps == 0 or last_of_epoch:
                with profiler.region("logging"):
                    log_window(run, window, tracker, bar)
                window = tracking.LogWindow()
            every = c.train.checkpoint_every_steps
            saved = bool(every) and progress.step % every == 0 and update != layout.updates_per_epoch - 1
            if saved:
                save_checkpoint(run)
            # The same answer on every rank, without waiting for the device (end_epoch asks again).
            asked = 0 if last_of_epoch else run.preemption.poll(acc, progress.step, c.train.preemption_poll_steps)
            if asked:
                if not saved:
                    save_checkpoint(run)
                raise Preempted(asked)
            profiler.step()
    epoch_done = end_update == layout.updates_per_epoch  # else the run ends mid-epoch (max_steps)
    seconds = time.perf_counter() - epoch_start
    return end_epoch(run, epoch, epoch_tally, epoch_images / seconds, epoch_wait / seconds, epoch_done, tracker)


class EpochBatches:
    """An epoch's loader batches. A loader that runs out early (shards that hold less than their
    manifest says) does not raise at once, which would leave the other processes waiting in the
    next collective until the timeout, then reporting a lost peer: it gives stand-ins (zeros,
    no labels: nothing is learnt from them) until the processes agree, at the next checkpoint or
    the epoch's end (``agree``), and all stop naming the process and the cause."""

    def __init__(self, batches, run: Run, epoch: int):
        self.batches, self.run, self.epoch = batches, run, epoch
        self.last = None

    def next(self):
        batch = next(self.batches, None)
        if batch is not None:
            self.last = batch
            return batch
        if self.run.loader_ran_out is None:
            self.run.loader_ran_out = self.epoch + 1
            self.run.log_any(f"epoch {self.epoch + 1}: the loader of process {self.run.accelerator.process_index} "
                             f"ran out of samples; stopping at the next checkpoint or the epoch's end")
        if self.last is None:
            c = self.run.config
            images = torch.zeros(c.data.batch_size, 3, c.data.image_size, c.data.image_size, dtype=torch.uint8)
            labels = torch.zeros(c.data.batch_size, dtype=torch.int64)
        else:
            images, labels, _ = self.last
        return torch.zeros_like(images), torch.full_like(labels, IGNORE_LABEL), []


def log_window(run: Run, window: tracking.LogWindow, tracker, bar) -> None:
    values = window.values(run.accelerator, scheduled_lr(run.optimizer))
    if run.progress.skipped_steps:
        values["train/skipped_steps"] = run.progress.skipped_steps
    # At the same steps on every rank, beside the window's own reduce: stop alike, or record and
    # train on (until then a bad sample's slot carries no label, so training on it is harmless).
    if run.bad_samples.flush(run.accelerator):
        values["data/skipped_samples"] = run.bad_samples.total
    if tracker is not None:
        tracker.log(values, step=run.progress.step)
        bar.set_postfix(loss=f"{values['train/loss']:.3f}", err=f"{values['train/top1_error']:.3f}",
                        ips=f"{values['throughput/images_per_sec']:.0f}")


def end_epoch(run: Run, epoch: int, tally: Tally, images_per_sec: float, data_wait_fraction: float,
              epoch_done: bool, tracker) -> dict:
    """Validate the trained weights and their EMA (every ``eval_every_epochs`` and at the end),
    log, mark the best of each, and save a checkpoint."""
    acc, c, progress, layout = run.accelerator, run.config, run.progress, run.layout
    _, short = agree(run, lost=False)  # before validation: a short epoch ends the run here
    if short:
        raise short
    step = progress.step
    final = step >= layout.total_updates
    record = {"epoch": epoch + 1 if epoch_done else epoch + step % layout.updates_per_epoch / layout.updates_per_epoch,
              "step": step, "lr": scheduled_lr(run.optimizer)}
    if not ((epoch + 1) % c.train.eval_every_epochs == 0 or final):
        save_checkpoint(run)
        return record
    trained = tally.reduce(acc)
    train = trained.errors()
    sync_buffers(run)
    models = {"model": run.bare_model()} | ({"ema": run.ema.module} if run.ema is not None else {})
    on_skipped = lambda records: run.bad_samples.add(records, step=step, epoch=epoch, rank=acc.process_index)  # noqa: E731
    results = dict(zip(models, validate(list(models.values()), run.input.val_batches(), acc,
                                        device_input=run.device_input, expected=run.data.val_samples,
                                        where=str(run.data.directory), on_skipped=on_skipped,
                                        on_batch=run.stall_watch.beat)))
    run.bad_samples.flush(acc)
    val = results["model"]
    record.update({
        "train_samples": trained.count, "train_top1_error": train["top1_error"], "train_top5_error": train["top5_error"], "train_loss": train["loss"],
        "val_top1_error": val["top1_error"], "val_top5_error": val["top5_error"], "val_loss": val["loss"],
        "val_samples": val["count"], "val_skipped": val["skipped"], "images_per_sec": images_per_sec * acc.num_processes,
        # the main process's share of the epoch spent waiting for batches; the time after validation
        "data_wait_fraction": data_wait_fraction, "wall_time": time.time(),
    })
    if acc.device.type == "cuda":
        record["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    values = {"val/top1_error": val["top1_error"], "val/top5_error": val["top5_error"], "val/loss": val["loss"]}
    if "ema" in results:
        ema = results["ema"]
        record.update({"ema_val_top1_error": ema["top1_error"], "ema_val_top5_error": ema["top5_error"]})
        values.update({"val_ema/top1_error": ema["top1_error"], "val_ema/top5_error": ema["top5_error"]})
    if tracker is not None:
        tracker.log(values, step=step)
    tracking.append_metrics(acc, run.run_dir, record)
    run.log(
        f"epoch {record['epoch']:g}: step {step}, train loss {train['loss']:.3f}, "
        f"train top-1 error {train['top1_error']:.3f}, val top-1/top-5 error {val['top1_error']:.3f}/{val['top5_error']:.3f}"
        + (f" (EMA {record['ema_val_top1_error']:.3f}/{record['ema_val_top5_error']:.3f})" if "ema" in results else "")
        + (f" on {val['count']} images ({val['skipped']} unreadable, skipped)" if val["skipped"] else "")
        + f", {record['images_per_sec']:.0f} img/s"
        + (f"; {run.bad_samples.in_epoch} unreadable training samples skipped (see "
           f"{run.run_dir / tracking.SKIPPED_FILE})" if run.bad_samples.in_epoch else "")
    )
    improved = [kind for kind, r in results.items() if r["top1_error"] < progress.best.get(kind, float("inf"))]
    for kind in improved:
        progress.best[kind] = results[kind]["top1_error"]
    path = save_checkpoint(run)
    for kind in improved:
        run.checkpoints.mark_best(kind, path, results[kind]["top1_error"], step)
    return record


def hold_run_directory(run: Run) -> None:
    """The main process locks the run directory for this job; every process learns the outcome,
    so that a refused launch ends everywhere with the main process's message."""
    acc, failure = run.accelerator, None
    if acc.is_main_process:
        try:
            run.lock = acquire(run.run_dir)
            run.lock.start_heartbeat()
            if run.lock.took_over is not None:
                run.log(f"took over the run directory from {run.lock.took_over.describe()} ({run.lock.took_over_why})")
        except Exception as exc:  # refused, or the directory cannot be written: the others must hear of it
            failure = exc
    if acc.reduce(torch.tensor([int(failure is not None)], device=acc.device), reduction="max").item():
        if failure is not None:
            raise failure
        raise on_every_rank(RunDirInUse(run.run_dir, message=f"{run.run_dir}: the main process could not "
                                                             f"lock it (its message says why)"))


def fit(run: Run) -> dict:
    hold_run_directory(run)
    try:
        return train_and_validate(run)
    finally:
        if run.lock is not None:
            run.lock.release()


def train_and_validate(run: Run) -> dict:
    acc, c = run.accelerator, run.config
    started = time.perf_counter()
    if acc.is_main_process:
        (run.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    resume(run)  # before config.yaml is rewritten: a refused resume keeps the original
    recorded, note = recorded_config(c)  # data.dir without its credentials, wherever it is written
    if acc.is_main_process:
        (run.run_dir / "config.yaml").write_text(dump(recorded))
        write_classes(run.run_dir, run.data.classes)  # for evaluation and prediction
    if note:
        run.log(note)
    tracking.start_tracking(acc, run.run_dir, run.progress.step, dump(recorded))
    tracker = open_trackers(acc, recorded, tracking.tensorboard(acc))  # None on the other processes
    if tracker is not None and run.progress.step == 0:  # what the recipe became at this scale
        tracker.log({"recipe/lr": run.lr, **({"recipe/ema_decay": run.ema_decay} if run.ema else {})}, step=0)
    run.log(describe(run))
    last_record: dict = {}
    run.model.train()
    profiler = StepProfiler.for_run(run)  # train.profile_steps: updates of this job's first epoch
    try:
        with run.stall_watch:  # a process that stops moving says where, before the others end the job
            while run.progress.step < run.layout.total_updates:
                epoch = run.progress.step // run.layout.updates_per_epoch
                last_record = train_one_epoch(run, epoch, tracker, profiler) or last_record
                asked = run.preemption.should_stop(acc) if run.progress.step < run.layout.total_updates else 0
                if asked:
                    raise Preempted(asked)  # end_epoch has just written the checkpoint
    except Preempted as stop:
        requeued, outcome = False, "not requeued; run the same command to resume"
        if stop.requeue and acc.is_main_process:
            requeued, outcome = run.preemption.requeue()
        run.log(f"stopped at step {run.progress.step} on {'SIGUSR2' if stop.requeue else 'SIGTERM'}, "
                f"checkpoint written; {outcome}")
        if tracker is not None:
            tracker.finish()
        acc.end_training()
        return {"preempted_at_step": run.progress.step, "requeued": requeued or (stop.requeue and not acc.is_main_process)}
    except BaseException:
        if tracker is not None:  # what was logged before the failure still reaches the trackers, and their runs close
            tracker.finish(wait_s=30, failed=True)
        raise
    sync_buffers(run)
    check_replicas(run)
    result = (f", validation top-1/top-5 error {last_record['val_top1_error']:.3f}/{last_record['val_top5_error']:.3f}"
              if "val_top1_error" in last_record else "")
    skipped = f", {run.progress.skipped_steps} fp16 steps skipped" if run.progress.skipped_steps else ""
    run.log(f"done in {time.perf_counter() - started:.0f}s{result}{skipped}."
            + (f" TensorBoard: tensorboard --logdir {run.run_dir / tracking.TRACKER_DIR}"
               if "tensorboard" in c.train.log_with else ""))
    if tracker is not None:
        tracker.finish()
    acc.end_training()
    return last_record


def train(config: Config) -> dict:
    """Open the prepared data a configuration names (preparing the demo's on first use) and train."""
    require_installed(config.train.log_with)  # before any data is prepared or opened
    if config.data.format == "ffcv":
        from pipeline.data.ffcv_input import require_ffcv

        require_ffcv()  # before any data is prepared or opened
    if config.data.loader == "dali":
        from pipeline.data.dali_input import require_dali

        require_dali()  # before any data is prepared or opened
    directory = _prepare_demo_once(Path(config.data.demo_root), config.data.format) if config.data.dir is None \
        else config.data.dir
    remote = RemoteOptions.from_config(config.data)
    try:
        data = open_prepared(directory, remote)
    except (PrepError, StoreError) as exc:
        raise ConfigError(f"data.dir: {error_line(exc)}") from exc
    if data.format != config.data.format:
        raise ConfigError(
            f"data.format: {config.data.format}, but {directory}/manifest.json describes {data.format} files "
            f"(set data.format={data.format}, or prepare them with 'python -m data_prep {'ffcv' if config.data.format == 'ffcv' else 'shards'}')"
        )
    return fit(build_run(config, data))


def _prepare_demo_once(root: Path, data_format: str) -> Path:
    """The demo data, prepared by the first process while the others wait for it (the
    process group does not exist yet, so they watch for the manifest on the shared disk)."""
    from data_prep.demo import ensure_demo, ensure_demo_ffcv
    from shards.manifest import MANIFEST

    directory = root / ("ffcv" if data_format == "ffcv" else "shards")
    if int(os.environ.get("RANK", "0")) == 0:
        return ensure_demo_ffcv(root) if data_format == "ffcv" else ensure_demo(root)
    deadline = time.monotonic() + 1800
    while not (directory / MANIFEST).is_file():
        if time.monotonic() > deadline:
            raise PrepError(f"{directory}: rank 0 did not prepare the demo data within 30 minutes (shared disk?)")
        time.sleep(1)
    return directory
