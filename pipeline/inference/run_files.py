"""A training run on disk, and the model it gives: shared by evaluate, predict and export.

``runs/NAME/`` holds ``config.yaml`` (the trainer's full configuration), ``classes.json`` (the
manifest's classes, written when training starts) and ``checkpoints/step-NNNNNNNN/``
(Accelerate's ``save_state``: ``model.safetensors``; with ``ema.enabled`` the EMA's state in
``ema.safetensors``); ``checkpoints/best.json`` names the best, for
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
from pipeline.models import build_model, use_torchvision_input
from pipeline.train.checkpoint import CLASSES_FILE, bare_keys
from pipeline.train.saved_runs import (  # noqa: F401 (CHECKPOINT_CHOICES, pick_checkpoint: this module's API too)
    CHECKPOINT_CHOICES,
    CONFIG_FILE,
    MODEL_FILE,
    RunError,
    ema_state,
    locate,
    pick_checkpoint,
)
from shards.manifest import PrepError, load_manifest
from shards.store import StoreError, is_remote


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


def build_for(config: Config, classes: list[dict]) -> nn.Module:
    """The untrained model of a configuration, with the input convention its weights need
    (``model.transform_input``, which the trainer resolves and writes into config.yaml; runs of
    earlier versions left it null and had it on exactly when they started from ``model.weights``)."""
    model = build_model(config.model.name, len(classes), config.model.aux_logits, config.model.dropout)
    transform_input = config.model.transform_input
    if transform_input is None:
        transform_input = bool(config.model.weights)
    if transform_input:
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
    state = ema_state(checkpoint, run_dir, config) if ema else bare_keys(load_file(checkpoint / MODEL_FILE))
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
    from pipeline.train.run import build_network  # the trainer's modules: not needed to read a run (torch.hub)

    classes = read_classes(None, config)
    try:
        model = build_network(config, len(classes), [c["id"] for c in classes])
    except ConfigError as exc:
        raise RunError(str(exc)) from exc
    return LoadedModel(model.to(device).eval(), config, classes, None, None)
