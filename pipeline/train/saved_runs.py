"""A training run on disk, read back: which checkpoint a run directory means, and its weights.

``runs/NAME/`` holds ``config.yaml``, ``classes.json`` and ``checkpoints/step-NNNNNNNN/``
(``model.safetensors``, and with ``ema.enabled`` the EMA's ``ema.safetensors``; earlier versions
pickled it as one of the ``custom_checkpoint_N.pkl`` objects); ``checkpoints/best.json`` names
the best checkpoint of the trained weights and of their EMA. Used by fine-tuning
(``model.weights``) and by evaluation, prediction, export and the hub.

An exported state dict ``FILE.pth`` has its metadata beside it, ``FILE.pth.json``: the network,
the classes, the input convention (:func:`read_export_meta`).
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import Config

from .checkpoint import BEST_FILE, EMA_FILE, STATE_FILE, CheckpointManager, bare_keys, saved_ema_state

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.safetensors"
CHECKPOINT_CHOICES = ("best", "last")


class RunError(ValueError):
    """A run, checkpoint or weights file that cannot be used; the message names the path."""


def locate(path: str | Path, which: str = "best", ema: bool = False) -> tuple[Path, Path]:
    """(run directory, checkpoint directory) for a run directory (checkpoint ``which``: best or
    last; the EMA's best with ``ema``) or for a checkpoint directory (whose run is its grandparent)."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path, pick_checkpoint(path, which, ema)
    if (path / MODEL_FILE).is_file():
        run_dir = path.parent.parent
        if not (run_dir / CONFIG_FILE).is_file():
            raise RunError(f"{path}: a checkpoint outside a run directory ({run_dir / CONFIG_FILE} is missing)")
        return run_dir, path
    if not path.exists():
        raise RunError(f"{path}: no such run or checkpoint directory")
    raise RunError(f"{path}: neither a run directory (no {CONFIG_FILE}) nor a checkpoint directory (no {MODEL_FILE})")


def pick_checkpoint(run_dir: Path, which: str, ema: bool = False) -> Path:
    """``best`` (as ``best.json`` names it for the trained weights, or with ``ema`` for their
    average; the newest when the run never evaluated), ``last``, or a checkpoint directory."""
    checkpoints = CheckpointManager(run_dir / "checkpoints", accelerator=None, keep_last=0)
    if which not in CHECKPOINT_CHOICES:
        path = Path(which)
        if not (path / MODEL_FILE).is_file():
            raise RunError(f"{path}: not a checkpoint directory (no {MODEL_FILE}); use best, last or a path")
        if path.resolve().parent.parent != run_dir.resolve():
            raise RunError(f"{path}: a checkpoint of another run than {run_dir}")
        return path
    latest = checkpoints.latest()
    if latest is None:
        raise RunError(f"{run_dir}: no complete checkpoint in {run_dir / 'checkpoints'}")
    best = checkpoints.best("ema" if ema else "model") if which == "best" else None
    if best is None:
        return latest
    path = checkpoints.directory / best["checkpoint"]
    if not (path / STATE_FILE).is_file():
        raise RunError(f"{checkpoints.directory / BEST_FILE} names {best['checkpoint']}, which is missing")
    return path


def ema_state(checkpoint: Path, run_dir: Path, config: Config) -> dict:
    """The EMA's weights from a checkpoint (torch's ``AveragedModel``), with its ``module.`` prefix taken off."""
    if not config.ema.enabled:
        raise RunError(f"{run_dir} was trained without EMA (ema.enabled: false); leave out --ema")
    state = saved_ema_state(checkpoint)
    if state is None:
        raise RunError(f"{checkpoint}: no EMA state ({EMA_FILE}, or an earlier version's plain "
                       f"custom_checkpoint_N.pkl)")
    return bare_keys({k: v for k, v in state.items() if k != "n_averaged"})


def read_export_meta(path: str | Path) -> dict | None:
    """The metadata ``python -m pipeline.inference.export`` wrote beside ``path``; None where
    there is none (RunError naming the file where it is not a JSON object)."""
    meta_path = Path(f"{path}.json")
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"{meta_path}: not the metadata of an export ({exc})") from exc
    if not isinstance(meta, dict):
        raise RunError(f"{meta_path}: not the metadata of an export (not a JSON object)")
    return meta


def exported_transform_input(meta: dict) -> bool:
    """Whether an export's network takes torchvision's input convention. Exports written before
    the metadata recorded it: as the ``builds_with`` line says."""
    transform_input = meta.get("transform_input")
    if transform_input is None:
        transform_input = "transform_input=True" in meta.get("builds_with", "")
    return bool(transform_input)
