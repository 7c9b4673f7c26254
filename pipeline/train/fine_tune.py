"""Starting from trained weights: ``model.weights``, fresh classifiers for other classes, ``model.freeze``.

``model.weights`` is one of

- a run directory of this project (its best checkpoint) or one of its checkpoint directories;
- a state dict written by ``python -m pipeline.inference.export --format state_dict`` (its
  ``FILE.json`` beside it names the network and the classes);
- torchvision's GoogLeNet file (``googlenet-1378be20.pth``), for ``googlenet_bn``.

Everything loads into the network the configuration builds, which must be the one the weights
belong to. The classifier layers (``pipeline.models.classifier_layers``: ``fc`` and the auxiliary
heads' last layers) load too when the weights were trained on the data's classes; with another
number of classes, or other class ids, they keep the fresh initialisation of the new model, and
one line says so. Auxiliary heads that the weights lack keep theirs as well.

``model.freeze`` then stops gradients to the stem (the convolutions before inception 3a) or to
everything but the classifier layers; frozen batch-norm layers also keep their running statistics
(they normalise as in evaluation, as detectron2's and torchvision's detection backbones do).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from pipeline.config import Config, ConfigError, load_config
from pipeline.models import AUX_PREFIXES, classifier_layers, stem_layers

from .checkpoint import CLASSES_FILE, bare_keys
from .saved_runs import CONFIG_FILE, MODEL_FILE, RunError, exported_transform_input, locate, read_export_meta


@dataclass
class StartWeights:
    """Weights to start from, and what is known of where they came from."""

    state: dict[str, Tensor]
    source: str  # the file or checkpoint read, for messages
    model_name: str | None  # the network they belong to; None: torchvision's file (googlenet_bn)
    class_ids: list[str] | None  # in index order, where the source records them
    transform_input: bool  # the input convention they were trained with (torchvision's published weights: on)


def read_start_weights(path: str | Path) -> StartWeights:
    """The weights ``model.weights`` names (RunError naming the path when they cannot be read)."""
    path = Path(path).expanduser()
    if path.is_dir():
        run_dir, checkpoint = locate(path)
        config = load_config(run_dir / CONFIG_FILE)
        classes_file = run_dir / CLASSES_FILE
        ids = [c["id"] for c in json.loads(classes_file.read_text())] if classes_file.is_file() else None
        transform_input = config.model.transform_input
        if transform_input is None:  # runs of earlier versions: on exactly when they started from model.weights
            transform_input = bool(config.model.weights)
        return StartWeights(bare_keys(load_file(checkpoint / MODEL_FILE)), str(checkpoint), config.model.name, ids,
                            transform_input)
    if not path.is_file():
        raise RunError(f"{path}: no such run directory, checkpoint directory or weights file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RunError(f"{path}: not a PyTorch state-dict file ({exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise RunError(f"{path}: not a state dict (a TorchScript or ONNX export cannot be trained from; "
                       f"export with --format state_dict)")
    meta = read_export_meta(path)
    if meta is not None:  # ours, from pipeline.inference.export
        if "model" not in meta or not isinstance(meta.get("classes"), list):
            raise RunError(f"{path}.json: not the metadata of a state-dict export (no model or classes)")
        return StartWeights(bare_keys(state), str(path), meta["model"], [c["id"] for c in meta["classes"]],
                            exported_transform_input(meta))
    return StartWeights(bare_keys(state), str(path), None, None, transform_input=True)  # torchvision's file


def load_start_weights(model: nn.Module, config: Config, class_ids: list[str] | None) -> str:
    """Load ``config.model.weights`` into ``model`` (built for the data's ``class_ids``; None: only
    the number of classes is compared), resolve
    ``model.transform_input`` into ``config`` and return the line that says what was loaded.
    ConfigError naming the source for weights that do not fit."""
    try:
        weights = read_start_weights(config.model.weights)
    except (RunError, ConfigError, OSError, ValueError) as exc:
        raise ConfigError(f"model.weights: {exc}") from exc
    name = config.model.name
    if weights.model_name is None and name != "googlenet_bn":
        raise ConfigError(f"model.weights: {weights.source} looks like torchvision's GoogLeNet file, which only "
                          f"googlenet_bn takes (model.name is {name})")
    if weights.model_name is not None and weights.model_name != name:
        raise ConfigError(f"model.weights: {weights.source} holds {weights.model_name} weights, but model.name "
                          f"is {name}")
    if config.model.transform_input is None:  # the caller applies it (use_torchvision_input)
        config.model.transform_input = weights.transform_input and name == "googlenet_bn"

    heads = classifier_layers(model)
    head_keys = {f"{layer}.{p}" for layer in heads for p in ("weight", "bias")}
    source_classes = next((weights.state[k].shape[0] for k in ("fc.weight", *sorted(head_keys)) if k in weights.state),
                          None)
    classes = next(layer.out_features for layer in heads.values())
    other_classes = source_classes != classes or None not in (weights.class_ids, class_ids) and weights.class_ids != class_ids
    state = dict(weights.state)
    if other_classes:
        state = {k: v for k, v in state.items() if k not in head_keys}
    expected = model.state_dict()
    if not any(k.startswith(AUX_PREFIXES) for k in expected):  # a model without heads: drop the weights'
        state = {k: v for k, v in state.items() if not k.startswith(AUX_PREFIXES)}
    misfits = [k for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if misfits:
        k = misfits[0]
        raise ConfigError(f"model.weights: {weights.source} does not fit {name}: {len(misfits)} tensors of another "
                          f"shape (first: {k} {tuple(state[k].shape)}, the model's {tuple(expected[k].shape)})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    fresh = fresh_layers(missing, expected)
    fresh = [layer for layer in heads if layer in fresh] + [layer for layer in fresh if layer not in heads]
    missing = [k for k in missing if not k.startswith(AUX_PREFIXES) and not (other_classes and k in head_keys)]
    if missing or unexpected:
        raise ConfigError(f"model.weights: {weights.source} does not fit {name}: {len(missing)} missing tensors "
                          f"(first: {missing[:3]}), {len(unexpected)} unexpected (first: {unexpected[:3]})")
    line = f"model.weights: {name} from {weights.source}"
    if other_classes:
        was = f"{source_classes} classes" if source_classes != classes else "other classes"
        line += (f"; it was trained on {was}, the data has {classes}: "
                 f"{', '.join(fresh)} start{'s' if len(fresh) == 1 else ''} fresh")
    elif fresh:
        line += f"; {', '.join(fresh)} start{'s' if len(fresh) == 1 else ''} fresh (not in the weights)"
    return line + (" (torchvision's input convention)" if config.model.transform_input else "")


def fresh_layers(missing: list[str], expected: dict) -> list[str]:
    """The layers that kept their initialisation, by name; a whole auxiliary head as one name."""
    layers = []
    for key in missing:
        head = next((p for p in AUX_PREFIXES if key.startswith(p)), None)
        # (batch norm fills in a missing num_batches_tracked itself, so it is never reported missing)
        whole = head is not None and all(k in missing for k in expected
                                         if k.startswith(head) and not k.endswith("num_batches_tracked"))
        layer = head.rstrip(".") if whole else key.rsplit(".", 1)[0]
        if layer not in layers:
            layers.append(layer)
    return layers


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """A batch-norm layer that stays in eval mode: it normalises with its running statistics and
    leaves them unchanged. Same parameters and buffers as ``nn.BatchNorm2d`` (its state dict is
    unchanged, unlike torchvision's ``ops.FrozenBatchNorm2d``, so checkpoints load either way)."""

    def train(self, mode: bool = True) -> FrozenBatchNorm2d:
        return super().train(False)


def freeze(model: nn.Module, part: str) -> str | None:
    """``model.freeze``: none, stem or all_but_head. Returns the line that says what was frozen."""
    if part == "none":
        return None
    if part == "stem":
        try:
            frozen = list(stem_layers(model).values())
        except ValueError as exc:
            raise ConfigError(f"model.freeze: {exc}") from exc
    else:
        head = {id(p) for layer in classifier_layers(model).values() for p in layer.parameters()}
        frozen = [m for m in model.modules() if not list(m.children()) and any(id(p) not in head for p in m.parameters())]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
        for bn in module.modules():
            if type(bn) is nn.BatchNorm2d:
                bn.__class__ = FrozenBatchNorm2d
    model.train(model.training)  # the frozen batch-norm layers switch to eval mode now
    count = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"model.freeze: {part}: {count:,} of {total:,} parameters frozen"
