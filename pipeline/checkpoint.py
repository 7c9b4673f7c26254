"""Atomic checkpoints with Accelerate's state saving; keep the last K and the best.

Every process writes its part (model, optimizer, scaler, registered scheduler and EMA, its
RNG states) into ``checkpoints/.tmp-step-NNNNNNNN`` through ``Accelerator.save_state``; after
a barrier the main process adds ``trainer_state.json`` and renames the directory to
``step-NNNNNNNN``. Only renamed directories are ever loaded, so a crash mid-write never
leaves a checkpoint that looks complete. We name directories ourselves instead of using
Accelerate's automatic naming, whose counter ``load_state()`` does not restore.

``best.json`` names the best checkpoint by validation top-1 error for each kind of weights
evaluated: ``{"model": {...}, "ema": {...}}`` (the trained weights, and their Polyak average,
which is the paper's final model), each with its checkpoint, error and step. Pruning keeps both.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from data_prep.manifest import atomic_write_json

from .config import ConfigError

STATE_FILE = "trainer_state.json"
BEST_FILE = "best.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


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

    def save(self, step: int, state: dict) -> Path:
        final = self.directory / f"step-{step:08d}"
        tmp = self.directory / f".tmp-step-{step:08d}"
        acc = self.accelerator
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crash at this very step
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(output_dir=str(tmp), safe_serialization=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            atomic_write_json(tmp / STATE_FILE, state)
            if final.exists():  # same step saved again (e.g. preempted right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        acc.wait_for_everyone()
        return final

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
