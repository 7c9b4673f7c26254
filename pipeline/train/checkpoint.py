"""Atomic checkpoints with Accelerate's state saving; keep the last K and the best.

Every process writes its part (model, optimizer, scaler, registered scheduler and EMA, its
RNG states) into ``checkpoints/.tmp-step-NNNNNNNN`` through ``Accelerator.save_state``; after
a barrier the main process adds ``trainer_state.json`` and renames the directory to
``step-NNNNNNNN``. Only renamed directories are ever loaded, so a crash mid-write never
leaves a checkpoint that looks complete. We name directories ourselves instead of using
Accelerate's automatic naming, whose counter ``load_state()`` does not restore. A save that
fails (a full disk, most often) removes its temporary directory and says what it needed.

``best.json`` names the best checkpoint by validation top-1 error for each kind of weights
evaluated: ``{"model": {...}, "ema": {...}}`` (the trained weights, and their Polyak average,
which is the paper's final model), each with its checkpoint, error and step. Pruning keeps both.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.config import ConfigError
from pipeline.ops.launch import on_every_rank
from shards.manifest import atomic_write_json

STATE_FILE = "trainer_state.json"
BEST_FILE = "best.json"
CLASSES_FILE = "classes.json"  # the manifest's classes, for evaluation and prediction
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def write_classes(run_dir: Path, classes: list[dict]) -> None:
    atomic_write_json(Path(run_dir) / CLASSES_FILE, classes)


# The wrappers' prefixes: DDP's module., torch.compile's _orig_mod. (checkpoints of earlier versions have them).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def bare_keys(state: dict) -> dict:
    """A state dict with the keys of the bare module, whatever wrapped it when it was saved."""
    def bare(key: str) -> str:
        while key.startswith(WRAPPER_PREFIXES):
            key = key.removeprefix("module.").removeprefix("_orig_mod.")
        return key
    return {bare(k): v for k, v in state.items()}


def save_plain_weights(accelerator) -> None:
    """Make ``save_state``/``load_state`` write and read the bare module's weights: Accelerate
    saves the prepared model's own state dict, whose keys carry ``module.`` under DDP and
    ``_orig_mod.`` when compiled. Plain keys resume across a change of ``model.compile`` and
    load into torchvision's model as they are."""

    def save(models, weights, output_dir) -> None:
        for i, model in enumerate(models):
            weights[i] = accelerator.unwrap_model(model, keep_torch_compile=False).state_dict()

    def load(models, input_dir) -> None:
        for i, model in enumerate(models):
            path = Path(input_dir) / f"model{f'_{i}' if i else ''}.safetensors"
            state = bare_keys(load_file(path))  # on the CPU; load_state_dict copies to the device
            accelerator.unwrap_model(model, keep_torch_compile=False).load_state_dict(state)
        models.clear()  # loaded: Accelerate loads what remains in the list

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


class NoSpaceForCheckpoint(RuntimeError):
    """A checkpoint did not fit on its disk; the message names the path and the space needed."""


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def out_of_space(exc: BaseException, directory: Path, needed: int) -> bool:
    """Writers report a full disk in their own words: safetensors says 'os error 28', torch's zip
    writer only 'unexpected pos' or 'file write failed' (then the free space decides)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(exc) or "os error 28" in str(exc):
        return True
    write_failed = "unexpected pos" in str(exc) or "file write failed" in str(exc)
    return write_failed and shutil.disk_usage(directory).free < needed


class CheckpointManager:
    def __init__(self, directory: Path, accelerator, keep_last: int):
        self.directory = Path(directory)
        self.accelerator = accelerator
        self.keep_last = keep_last

    def complete(self) -> list[Path]:
        """Finished checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def best(self, kind: str = "model") -> dict | None:
        """The best checkpoint's record for ``kind`` (model or ema), if it was ever evaluated."""
        return self._best_records().get(kind)

    def _best_records(self) -> dict:
        path = self.directory / BEST_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def save(self, step: int, state: dict, size_estimate=lambda: 0) -> Path:
        """``size_estimate()``: about how many bytes this checkpoint takes, for the message when
        it does not fit and there is no earlier one to measure."""
        final = self.directory / f"step-{step:08d}"
        tmp = self.directory / f".tmp-step-{step:08d}"
        acc = self.accelerator
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crash at this very step
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        error = None
        try:
            acc.save_state(output_dir=str(tmp), safe_serialization=True)
            if acc.is_main_process:
                atomic_write_json(tmp / STATE_FILE, state)
        except Exception as exc:  # held until every process knows: a one-sided raise would hang the others
            error = exc
        full = error is not None and out_of_space(error, self.directory, size_estimate())
        outcome = acc.reduce(torch.tensor([2 if full else int(error is not None)], device=acc.device), reduction="max")
        if outcome.item():
            self._failed(final, tmp, error, full=outcome.item() == 2, size_estimate=size_estimate)
        if acc.is_main_process:
            if final.exists():  # same step saved again (e.g. preempted right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        acc.wait_for_everyone()
        return final

    def _failed(self, final: Path, tmp: Path, error: BaseException | None, full: bool, size_estimate) -> None:
        """Every process raises: the main process removes the half-written directory."""
        latest = self.latest()
        needed = max(directory_bytes(latest) if latest else size_estimate(), directory_bytes(tmp))
        free = shutil.disk_usage(self.directory).free
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written checkpoint behind
        self.accelerator.wait_for_everyone()
        if full:
            cause = f" ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})" if error else ""
            raise on_every_rank(NoSpaceForCheckpoint(
                f"no space left on device writing checkpoint {final}: it needs about {needed / 1e6:.0f} MB "
                f"and {free / 1e6:.0f} MB were free; the half-written {tmp.name} was removed and the earlier "
                f"checkpoints are intact. Free space, then run the same command to resume{cause}"))
        if error is not None:
            raise error
        raise on_every_rank(RuntimeError(f"writing checkpoint {final} failed in another process (see its error)"))

    def mark_best(self, kind: str, checkpoint: Path, metric: float, step: int) -> None:
        if self.accelerator.is_main_process:
            records = self._best_records()
            records[kind] = {"checkpoint": checkpoint.name, "val_top1_error": metric, "step": step}
            atomic_write_json(self.directory / BEST_FILE, records)
            self._prune()

    def _prune(self) -> None:
        best = {record["checkpoint"] for record in self._best_records().values()}
        done = self.complete()
        for path in done[: -self.keep_last]:
            if path.name not in best:
                shutil.rmtree(path, ignore_errors=True)
        if done:  # half-written checkpoints older than the newest complete one are useless
            for stale in self.directory.glob(".tmp-step-*"):
                if stale.name.removeprefix(".tmp-") < done[-1].name:
                    shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def state(checkpoint: Path) -> dict:
        return json.loads((checkpoint / STATE_FILE).read_text())

    def load(self, checkpoint: Path) -> dict:
        self.accelerator.load_state(str(checkpoint))
        return self.state(checkpoint)


def resume_latest(checkpoints: CheckpointManager, layout: dict) -> tuple[Path, dict] | None:
    """Load the newest complete checkpoint into the registered objects and return it with its
    trainer state; None when there is none. Refused (ConfigError) when it was written with
    another batch layout or schedule, which would not replay the same batches and rates."""
    latest = checkpoints.latest()
    if latest is None:
        return None
    saved = checkpoints.state(latest).get("layout", {})
    changed = {k: (saved.get(k), v) for k, v in layout.items() if saved.get(k) != v}
    if changed:
        detail = "; ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
        raise ConfigError(
            f"{latest} was written with another batch layout or schedule ({detail}); resuming would "
            f"not replay the same batches and learning rates. Use the original settings, or a new name=..."
        )
    return latest, checkpoints.load(latest)
