"""A training run on disk, and the model it gives: shared by evaluate, predict and export.

``runs/NAME/`` holds ``config.yaml`` (the trainer's full configuration), ``classes.json`` (the
manifest's classes, written when training starts) and ``checkpoints/step-NNNNNNNN/``
(Accelerate's ``save_state``: ``model.safetensors``, and with ``ema.enabled`` the EMA's state as
one of the ``custom_checkpoint_N.pkl`` objects); ``checkpoints/best.json`` names the best, for
the trained weights and for their EMA.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from pipeline.config import Config, ConfigError, load_config
from pipeline.models import build_model, load_torchvision_weights, use_torchvision_input
from pipeline.train.checkpoint import BEST_FILE, CLASSES_FILE, STATE_FILE, CheckpointManager, bare_keys
from shards.manifest import PrepError, load_manifest
from shards.store import StoreError, is_remote

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.safetensors"
CHECKPOINT_CHOICES = ("best", "last")


class RunError(ValueError):
    """A run, checkpoint or weights file that cannot be used; the message names the path."""


@dataclass
class LoadedModel:
    model: nn.Module  # eval mode
    config: Config
    classes: list[dict]  # index, id, name (the manifest's)
    run_dir: Path | None
    checkpoint: Path | None  # None: the model as the trainer starts it (model.weights)
    ema: bool = False

    @property
    def description(self) -> str:
        where = str(self.checkpoint) if self.checkpoint else f"{self.config.model.weights} (model.weights)"
        return f"{self.config.model.name} from {where}" + (" (EMA)" if self.ema else "")


def data_directory(config: Config) -> Path | str:
    """The prepared data a configuration trains on (``data.dir``: a folder or an object-store URL,
    or the demo's, as the trainer finds it)."""
    if config.data.dir:
        return config.data.dir if is_remote(config.data.dir) else Path(config.data.dir)
    return Path(config.data.demo_root) / ("ffcv" if config.data.format == "ffcv" else "shards")


def read_classes(run_dir: Path | None, config: Config) -> list[dict]:
    """The run's ``classes.json``; for runs that have none, the manifest of its data."""
    if run_dir is not None and (Path(run_dir) / CLASSES_FILE).is_file():
        return json.loads((Path(run_dir) / CLASSES_FILE).read_text())
    try:
        return load_manifest(data_directory(config))["classes"]
    except (PrepError, StoreError) as exc:
        where = f"{run_dir}: no {CLASSES_FILE}, and " if run_dir is not None else ""
        raise RunError(f"{where}the class names of data.dir cannot be read: {exc}") from exc


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


def _ema_state(checkpoint: Path, run_dir: Path, config: Config) -> dict:
    """The EMA's weights from a checkpoint: the custom object whose state has ``n_averaged``
    (torch's ``AveragedModel``), with its ``module.`` prefix taken off."""
    if not config.ema.enabled:
        raise RunError(f"{run_dir} was trained without EMA (ema.enabled: false); leave out --ema")
    for path in sorted(checkpoint.glob("custom_checkpoint_*.pkl")):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            continue  # the scheduler's state, or anything else that is not plain tensors
        if isinstance(state, dict) and "n_averaged" in state:
            return bare_keys({k: v for k, v in state.items() if k != "n_averaged"})
    raise RunError(f"{checkpoint}: no EMA state among its custom_checkpoint_*.pkl files")


def build_for(config: Config, classes: list[dict]) -> nn.Module:
    """The untrained model of a configuration, with the input convention its weights need."""
    model = build_model(config.model.name, len(classes), config.model.aux_logits, config.model.dropout)
    if config.model.weights:
        use_torchvision_input(model)
    return model


def load_model(path: str | Path, which: str = "best", ema: bool = False,
               device: str | torch.device = "cpu") -> LoadedModel:
    """The model of a run directory or checkpoint directory, in eval mode on ``device``."""
    run_dir, checkpoint = locate(path, which, ema)
    try:
        config = load_config(run_dir / CONFIG_FILE)
    except ConfigError as exc:
        raise RunError(f"{run_dir / CONFIG_FILE}: {exc}") from exc
    classes = read_classes(run_dir, config)
    model = build_for(config, classes)
    state = _ema_state(checkpoint, run_dir, config) if ema else bare_keys(load_file(checkpoint / MODEL_FILE))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise RunError(f"{checkpoint}: does not fit {config.model.name} with {len(classes)} classes ({exc})") from exc
    return LoadedModel(model.to(device).eval(), config, classes, run_dir, checkpoint, ema)


def load_initial_model(config: Config, device: str | torch.device = "cpu") -> LoadedModel:
    """The model as the trainer starts it, for a configuration with ``model.weights`` (e.g.
    torchvision's published GoogLeNet weights, to check the data and the evaluation)."""
    if not config.model.weights:
        raise RunError("model.weights: not set; without it the model of a recipe is untrained")
    classes = read_classes(None, config)
    model = build_for(config, classes)
    try:
        load_torchvision_weights(model, config.model.weights)
    except ValueError as exc:
        raise RunError(f"model.weights: {exc}") from exc
    return LoadedModel(model.to(device).eval(), config, classes, None, None)
