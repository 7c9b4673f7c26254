"""Atomic checkpoints with Accelerate's state saving; keep the last K and the best.

Every process writes its part (model, optimizer, scaler, its RNG states) into
``checkpoints/.tmp-step-NNNNNNNN`` through ``Accelerator.save_state``; the main process adds
the scheduler's state (``scheduler.json``), the EMA's (``ema.safetensors``) and, after a
barrier, ``trainer_state.json``, and renames the directory to ``step-NNNNNNNN``. Only renamed
directories are ever loaded, so a crash mid-write never leaves a checkpoint that looks complete.
We name directories ourselves instead of using Accelerate's automatic naming, whose counter
``load_state()`` does not restore. A save that
fails (a full disk, most often) removes its temporary directory and says what it needed.

The scheduler and the EMA are not Accelerate's registered objects: it pickles those into
``custom_checkpoint_N.pkl`` and unpickles them with ``weights_only=False``, which runs whatever
code a file names. Ours are plain data, and checkpoints of earlier versions resume when their
pickles load with ``weights_only=True``; one that holds anything else is refused, naming it.

Which checkpoint a job resumes from is the main process's choice (``agreed_latest``): on a
shared disk another node may not list a new ``step-N`` yet (NFS caches directories for up to a
minute), and a process that resumed from an older one would leave the replicas apart.

``best.json`` names the best checkpoint by validation top-1 error for each kind of weights
evaluated: ``{"model": {...}, "ema": {...}}`` (the trained weights, and their Polyak average,
which is the paper's final model), each with its checkpoint, error and step. Pruning keeps both.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.config import ConfigError
from pipeline.ops.launch import on_every_rank
from shards.manifest import atomic_write_json

STATE_FILE = "trainer_state.json"
BEST_FILE = "best.json"
CLASSES_FILE = "classes.json"  # the manifest's classes, for evaluation and prediction
SCHEDULER_FILE = "scheduler.json"  # the learning-rate scheduler's state_dict
EMA_FILE = "ema.safetensors"  # the EMA's state_dict (torch's AveragedModel: module.*, n_averaged)
# Earlier versions' scheduler (0) and EMA (1): Accelerate's custom states, torch.save'd pickles.
LEGACY_STATE = re.compile(r"^custom_checkpoint_\d+\.pkl$")
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


def load_plain(path: Path):
    """``torch.load`` of a file that may hold tensors, numbers, strings and containers only
    (``weights_only=True``); a file that names anything else to unpickle is refused, naming it
    and what it names, and none of it runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        named = re.search(r"GLOBAL (\S+)", str(exc))
        checkpoint = Path(path).parent
        raise ConfigError(
            f"{path}: not plain state: unpickling it would call {named.group(1) if named else 'code'}, so it is not "
            f"loaded. Resume from another checkpoint (move {checkpoint.name} out of {checkpoint.parent}), or start "
            f"a new run from its weights: model.weights={checkpoint} name=..."
        ) from None


def legacy_states(checkpoint: Path) -> dict[str, dict]:
    """The scheduler's and the EMA's states of a checkpoint of an earlier version (``scheduler``,
    ``ema``: those present), from its custom_checkpoint_N.pkl files; ConfigError if one is not plain."""
    states = {}
    for path in sorted(p for p in checkpoint.iterdir() if LEGACY_STATE.match(p.name)):
        state = load_plain(path)
        if isinstance(state, dict):
            states["ema" if "n_averaged" in state else "scheduler"] = state
    return states


def saved_ema_state(checkpoint: Path) -> dict | None:
    """The EMA's state_dict in a checkpoint (``module.``-prefixed keys and ``n_averaged``), also
    from an earlier version's pickles where they are plain; None where there is none."""
    if (checkpoint / EMA_FILE).is_file():
        return load_file(checkpoint / EMA_FILE)
    try:
        return legacy_states(checkpoint).get("ema")
    except ConfigError:
        return None


@contextlib.contextmanager
def without_legacy_states(checkpoint: Path):
    """The checkpoint as a folder of links without its custom_checkpoint_N.pkl files, for
    ``Accelerator.load_state``: it would unpickle them with ``weights_only=False`` (and, with no
    objects registered, it refuses a folder that has any)."""
    with tempfile.TemporaryDirectory(prefix=f"{checkpoint.name}-") as view:
        for entry in checkpoint.iterdir():
            if not LEGACY_STATE.match(entry.name):
                (Path(view) / entry.name).symlink_to(entry.resolve())
        yield Path(view)


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
    """``resume_wait_s``: how long a process waits to see the checkpoint the main process chose
    (``agreed_latest``)."""

    _NOT_CHOSEN = object()

    def __init__(self, directory: Path, accelerator, keep_last: int, resume_wait_s: float = 0.0):
        self.directory = Path(directory)
        self.accelerator = accelerator
        self.keep_last = keep_last
        self.resume_wait_s = resume_wait_s
        self.scheduler = None
        self.ema = None
        self._agreed = self._NOT_CHOSEN

    def register(self, scheduler=None, ema=None) -> None:
        """The learning-rate scheduler and the EMA (an AveragedModel), saved and loaded with each checkpoint."""
        self.scheduler, self.ema = scheduler, ema

    def complete(self) -> list[Path]:
        """Finished checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def agreed_latest(self) -> Path | None:
        """The checkpoint every process resumes from: the newest complete one the main process
        sees (None: none), chosen once. A process that does not see it yet waits up to
        ``resume_wait_s``; if one still does not, every process stops with one line naming it."""
        if self._agreed is not self._NOT_CHOSEN:
            return self._agreed
        acc = self.accelerator
        chosen = self.latest() if acc.is_main_process else None
        if acc.num_processes > 1:
            step = torch.tensor([int(chosen.name.removeprefix("step-")) if chosen else -1], device=acc.device)
            torch.distributed.broadcast(step, src=0)
            chosen = self.directory / f"step-{int(step.item()):08d}" if step.item() >= 0 else None
            if chosen is not None:
                self._wait_until_all_see(chosen)
        self._agreed = chosen
        return chosen

    def _wait_until_all_see(self, chosen: Path) -> None:
        acc = self.accelerator
        seen = (chosen / STATE_FILE).is_file()
        if not seen:
            print(f"process {acc.process_index}: waiting for {chosen}, which the main process resumes from, "
                  f"to appear here (up to {self.resume_wait_s:g} s)", file=sys.stderr, flush=True)  # before any bar
            deadline = time.monotonic() + self.resume_wait_s
            while not seen and time.monotonic() < deadline:
                time.sleep(0.5)
                seen = (chosen / STATE_FILE).is_file()
        missing = acc.gather(torch.tensor([int(not seen)], device=acc.device)).tolist()
        blind = [rank for rank, flag in enumerate(missing) if flag]
        if blind:
            raise on_every_rank(ConfigError(
                f"{chosen}: the main process resumes from this checkpoint, but process{'es' if len(blind) > 1 else ''} "
                f"{', '.join(map(str, blind))} did not see it within {self.resume_wait_s:g} s (half of "
                f"train.collective_timeout_s). Is {self.directory} on a disk all nodes share, and do they see "
                f"new files there (NFS: lookupcache, actimeo)?"))

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
                self._save_states(tmp)
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

    def _save_states(self, directory: Path) -> None:
        """The scheduler's and the EMA's states, as plain data (every process holds the same)."""
        if self.scheduler is not None:
            (directory / SCHEDULER_FILE).write_text(json.dumps(self.scheduler.state_dict()))
        if self.ema is not None:  # contiguous: channels_last weights are not, and safetensors stores them so
            save_file({k: v.detach().contiguous() for k, v in self.ema.state_dict().items()}, directory / EMA_FILE)

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
        acc = self.accelerator
        try:  # first: a refused file leaves everything as it was
            states, refused = self._read_states(checkpoint), None
        except ConfigError as exc:
            states, refused = {}, exc
        refusals = int(acc.reduce(torch.tensor([int(refused is not None)], device=acc.device), reduction="sum").item())
        if refusals:  # every process stops, and the line is printed once where all refused alike
            if refused is None:
                raise on_every_rank(ConfigError(f"{checkpoint}: another process refused its state (see its error)"))
            raise on_every_rank(refused) if refusals == acc.num_processes else refused
        if any(LEGACY_STATE.match(p.name) for p in checkpoint.iterdir()):
            with without_legacy_states(checkpoint) as view:
                acc.load_state(str(view))
        else:
            acc.load_state(str(checkpoint))
        if self.scheduler is not None:
            self.scheduler.load_state_dict(states["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(states["ema"])
        return self.state(checkpoint)

    def _read_states(self, checkpoint: Path) -> dict[str, dict]:
        if (checkpoint / SCHEDULER_FILE).is_file():
            states = {"scheduler": json.loads((checkpoint / SCHEDULER_FILE).read_text())}
            if (checkpoint / EMA_FILE).is_file():
                states["ema"] = load_file(checkpoint / EMA_FILE)
        else:
            states = legacy_states(checkpoint)
        if self.scheduler is not None and "scheduler" not in states:
            raise ConfigError(f"{checkpoint}: no learning-rate scheduler state ({SCHEDULER_FILE}); "
                              f"not a complete checkpoint of this trainer")
        if self.ema is not None and "ema" not in states:
            raise ConfigError(f"{checkpoint}: no EMA state ({EMA_FILE}): the run was trained with "
                              f"ema.enabled=false; resume with ema.enabled=false, or start a new run (name=...)")
        return states


def resume_latest(checkpoints: CheckpointManager, layout: dict) -> tuple[Path, dict] | None:
    """Load the newest complete checkpoint (as the main process sees it) into the registered
    objects and return it with its trainer state; None when there is none. Refused (ConfigError)
    when it was written with another batch layout or schedule, which would not replay the same
    batches and rates."""
    latest = checkpoints.agreed_latest()
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
