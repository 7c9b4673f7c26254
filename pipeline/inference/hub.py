"""torch.hub's entry points (``hubconf.py`` at the repository root calls :func:`load`).

``torch.hub.load(REPO_OR_DIR, "googlenet", weights=RUN)`` (the paper's network) or
``"googlenet_bn"`` (torchvision's batch-norm GoogLeNet) gives the model in eval mode, untrained
(``weights=None``) or with the weights of a run of this project: a run directory (its best
checkpoint as ``best.json`` names it, ``checkpoint="last"`` or a checkpoint directory of it; with
``ema=True`` the EMA's), a checkpoint directory, or a state dict written by ``export`` (``FILE.pth``
with its ``FILE.pth.json``). The model carries:

- ``model.classes``: the class names in index order, ``model.class_ids`` their manifest ids
  (wnids for ImageNet); None for an untrained model;
- ``model.transforms``: a PIL image -> the normalised float tensor [3, S, S] that the trainer
  validates on (the same pixels as ``predict`` with 1 crop), an :class:`EvalTransform`;
- ``model.meta``: the model's name, where its weights came from, and its input size.

None of them is a module, parameter or buffer: the state dict, ``.to()`` and ``torch.jit`` see
the plain network. This project publishes no weights to download.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from imaging.crops import eval_resize_for
from imaging.specs import IMAGENET_MEAN, IMAGENET_STD
from pipeline.config import ConfigError, load_config
from pipeline.models import AUX_PREFIXES, build_model, use_torchvision_input
from pipeline.train.saved_runs import exported_transform_input, read_export_meta

from .export import FORMATS
from .multi_crop import image_crops, network_input
from .run_files import CHECKPOINT_CHOICES, CONFIG_FILE, RunError, load_model, locate

ENTRY_POINTS = ("googlenet", "googlenet_bn")
UNTRAINED = {"num_classes": 1000, "aux_logits": True, "image_size": 224}  # weights=None: ImageNet's
NO_DOWNLOADS = ("this project publishes no weights to download: weights= is a run directory, a checkpoint "
                "directory or an exported state dict of your own")


@dataclass(frozen=True, repr=False)
class EvalTransform:
    """The trainer's validation transform, as ``predict`` does it with 1 crop: the shorter side
    resized to ``eval_resize`` and the centre ``image_size`` x ``image_size`` crop, in one bilinear
    box-resize of the region it covers (a JPEG that is not loaded yet is decoded at a reduced scale
    when that leaves enough pixels), RGB / 255, then ImageNet's mean and std.

    ``transform(image)``: a PIL image (any mode) -> float32 [3, S, S]; stack them for a batch.
    """

    image_size: int
    eval_resize: int
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"model.transforms takes a PIL image (PIL.Image.open(path)), not {type(image).__name__}")
        return network_input(image_crops(image, 1, self.image_size, self.eval_resize))[0]

    def __repr__(self) -> str:
        s = self.image_size
        return (f"EvalTransform(resize shorter side to {self.eval_resize}, centre crop {s}x{s} (bilinear), "
                f"RGB / 255, mean={self.mean}, std={self.std} -> float32 [3, {s}, {s}])")


def load(name: str, weights: str | Path | None = None, *, checkpoint: str = "best", ema: bool = False,
         device: str | torch.device = "cpu", num_classes: int | None = None,
         aux_logits: bool | None = None) -> nn.Module:
    """The entry point ``name`` (``googlenet`` or ``googlenet_bn``), in eval mode on ``device``.

    ``weights=None``: untrained, with ``num_classes`` (default 1000) and ``aux_logits`` (default
    True), no class names, and the transform of 224-px ImageNet training. Otherwise both come from
    the weights, and given ones must agree with them. RunError (a ValueError) naming the path for
    weights that cannot be used, including those of another network than ``name``.
    """
    if name not in ENTRY_POINTS:
        raise ValueError(f"{name!r}: the entry points are {', '.join(ENTRY_POINTS)}")
    if weights is None:
        if ema or checkpoint != "best":
            raise ValueError("checkpoint= and ema= choose among the weights of a run; with weights=None the model "
                             "is untrained")
        return _untrained(name, num_classes, aux_logits, device)
    path = Path(weights)
    if path.is_file() or (not path.exists() and path.suffix in FORMATS.values()):
        model, classes, meta = _from_export(name, path, checkpoint, ema)
    else:
        model, classes, meta = _from_run(name, path, checkpoint, ema)
    _check_asked(path, model, len(classes), num_classes, aux_logits)
    return _with_attributes(model.to(device).eval(), classes, meta)


def _untrained(name: str, num_classes: int | None, aux_logits: bool | None, device) -> nn.Module:
    model = build_model(name, UNTRAINED["num_classes"] if num_classes is None else num_classes,
                        UNTRAINED["aux_logits"] if aux_logits is None else aux_logits)
    size = UNTRAINED["image_size"]
    meta = {"model": name, "source": None, "checkpoint": None, "ema": False, "image_size": size,
            "eval_resize": eval_resize_for(size, None)}
    return _with_attributes(model.to(device).eval(), None, meta)


def _wrong_network(path: Path, actual: str, name: str) -> RunError:
    if actual in ENTRY_POINTS:
        return RunError(f"{path}: weights of {actual}, not {name}; load them with torch.hub.load(..., {actual!r}, ...)")
    return RunError(f"{path}: weights of {actual}, not {name}; this hub has only {' and '.join(ENTRY_POINTS)} "
                    f"(python -m pipeline.inference.predict takes every model)")


def _from_run(name: str, path: Path, checkpoint: str, ema: bool) -> tuple[nn.Module, list[dict], dict]:
    """A run directory or a checkpoint directory, through ``run_files.load_model``."""
    if not path.exists():
        raise RunError(f"{path}: no such run directory, checkpoint directory or exported file ({NO_DOWNLOADS})")
    if checkpoint != "best" and not (path / CONFIG_FILE).is_file():
        raise RunError(f"{path}: checkpoint={checkpoint!r} chooses among the checkpoints of a run directory "
                       f"({', '.join(CHECKPOINT_CHOICES)} or a checkpoint directory); this is not one")
    run_dir, _ = locate(path, checkpoint, ema)
    try:
        config = load_config(run_dir / CONFIG_FILE)
    except ConfigError as exc:
        raise RunError(f"{run_dir / CONFIG_FILE}: {exc}") from exc
    if config.model.name != name:
        raise _wrong_network(path, config.model.name, name)
    if ema and not config.ema.enabled:
        raise RunError(f"{run_dir} was trained without EMA (ema.enabled: false); leave out ema=True")
    loaded = load_model(path, checkpoint, ema)
    size = loaded.config.data.image_size
    meta = {"model": name, "source": str(path), "checkpoint": str(loaded.checkpoint), "ema": ema,
            "image_size": size, "eval_resize": eval_resize_for(size, loaded.config.data.eval_resize)}
    return loaded.model, loaded.classes, meta


def _from_export(name: str, path: Path, checkpoint: str, ema: bool) -> tuple[nn.Module, list[dict], dict]:
    """A state dict written by ``python -m pipeline.inference.export`` and its ``FILE.json``.
    Exports written before ``FILE.json`` had ``aux_logits`` and ``transform_input``: the auxiliary
    heads are those of the state dict, ``transform_input`` as in ``builds_with``."""
    if not path.is_file():
        raise RunError(f"{path}: no such file ({NO_DOWNLOADS})")
    meta = read_export_meta(path)
    fmt = (meta or {}).get("format") or {suffix: f for f, suffix in FORMATS.items()}.get(path.suffix)
    if fmt == "torchscript":
        raise RunError(f"{path}: a TorchScript export; load it with torch.jit.load({str(path)!r}), not torch.hub")
    if fmt == "onnx":
        raise RunError(f"{path}: an ONNX export; run it with onnxruntime.InferenceSession({str(path)!r}), "
                       f"not torch.hub")
    if meta is None:
        raise RunError(f"{path}: no {path.name}.json beside it; torch.hub takes the state dicts that "
                       f"python -m pipeline.inference.export writes, with their metadata")
    if fmt != "state_dict" or not isinstance(meta.get("classes"), list) or "model" not in meta:
        raise RunError(f"{path}.json: not the metadata of a state-dict export (format {fmt!r})")
    if meta["model"] != name:
        raise _wrong_network(path, meta["model"], name)
    if checkpoint != "best":
        raise RunError(f"{path}: an exported file holds one set of weights; checkpoint= is for run directories")
    if ema and not meta.get("ema"):
        raise RunError(f"{path}: exported without --ema; leave out ema=True (or export the EMA's weights)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RunError(f"{path}: not a PyTorch state-dict file ({exc})") from exc
    if not isinstance(state, dict):
        raise RunError(f"{path}: not a state dict")
    classes = meta["classes"]
    aux_logits = meta.get("aux_logits")
    if aux_logits is None:
        aux_logits = any(k.startswith(AUX_PREFIXES) for k in state)
    model = build_model(name, len(classes), bool(aux_logits), meta.get("dropout"))
    if exported_transform_input(meta):
        use_torchvision_input(model)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise RunError(f"{path}: does not fit {name} with {len(classes)} classes ({exc})") from exc
    size = meta["image_size"]
    info = {"model": name, "source": str(path), "checkpoint": meta.get("checkpoint"), "ema": bool(meta.get("ema")),
            "image_size": size, "eval_resize": meta.get("eval_resize") or eval_resize_for(size, None)}
    return model, classes, info


def _check_asked(path: Path, model: nn.Module, classes: int, num_classes: int | None,
                 aux_logits: bool | None) -> None:
    if num_classes is not None and num_classes != classes:
        raise RunError(f"{path}: its weights have {classes} classes, not num_classes={num_classes}")
    has_aux = getattr(model, "aux1", None) is not None
    if aux_logits is not None and bool(aux_logits) != has_aux:
        raise RunError(f"{path}: its weights have {'' if has_aux else 'no '}auxiliary heads, "
                       f"not aux_logits={aux_logits}")


def _with_attributes(model: nn.Module, classes: list[dict] | None, meta: dict) -> nn.Module:
    """Plain attributes (not modules, parameters or buffers), so that the state dict is the network's."""
    model.classes = None if classes is None else [c["name"] for c in classes]
    model.class_ids = None if classes is None else [c["id"] for c in classes]
    model.transforms = EvalTransform(meta["image_size"], meta["eval_resize"])
    model.meta = meta
    return model
