"""A plain model file from a checkpoint: state dict, TorchScript or ONNX.

    python -m pipeline.inference.export --checkpoint runs/demo --format state_dict|torchscript|onnx [--ema] [--out FILE]

- ``state_dict``: ``torch.save`` of the model's state dict; for ``googlenet_bn`` it loads into
  ``torchvision.models.googlenet(num_classes=..., aux_logits=..., init_weights=False)`` unchanged
  (the exact call is printed and stored in the metadata).
- ``torchscript``: the eval-mode model traced to its main logits (no auxiliary heads).
- ``onnx``: the same through ``torch.onnx.export`` (torch.export based; needs ``onnx`` and
  ``onnxscript``: ``pip install '.[export]'``), with a dynamic batch dimension.

Next to the file, ``FILE.json`` records the classes, the input size and the normalisation, and
what rebuilding the model needs (``aux_logits``, ``transform_input``, ``dropout``), with which
``torch.hub.load(..., weights=FILE)`` loads a state dict (``hub``).
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from imaging.crops import eval_resize_for
from imaging.specs import IMAGENET_MEAN, IMAGENET_STD
from pipeline.models import forward_with_aux

from .run_files import LoadedModel, RunError, load_model

FORMATS = {"state_dict": ".pth", "torchscript": ".pt", "onnx": ".onnx"}


class MainLogits(nn.Module):
    """The model's main logits as a plain tensor, whatever the model returns."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return forward_with_aux(self.model, images).logits


def torchvision_constructor(loaded: LoadedModel) -> str:
    """The call that builds a model this state dict loads into."""
    c, n = loaded.config.model, len(loaded.classes)
    if c.name == "googlenet_bn":
        transform = bool(getattr(loaded.model, "transform_input", False))
        return (f"torchvision.models.googlenet(num_classes={n}, aux_logits={c.aux_logits}, "
                f"transform_input={transform}, init_weights=False)")
    if c.name == "googlenet":
        return f"pipeline.models.build_model('googlenet', {n}, aux_logits={c.aux_logits})"
    return f"torchvision.models.get_model({c.name!r}, num_classes={n})"


def default_out(loaded: LoadedModel, fmt: str) -> Path:
    name = f"{loaded.config.model.name}-{loaded.checkpoint.name}" + ("-ema" if loaded.ema else "")
    return loaded.run_dir / "export" / (name + FORMATS[fmt])


def export(loaded: LoadedModel, fmt: str, out: Path) -> Path:
    model = MainLogits(loaded.model.cpu()).eval()
    size = loaded.config.data.image_size
    example = torch.randn(2, 3, size, size)  # batch 2: a batch of 1 would be specialised as a constant
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "state_dict":
        torch.save(model.model.state_dict(), out)
    elif fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, and asked for here
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # LRN's check for empty inputs
            torch.jit.trace(model, example).save(str(out))
    elif fmt == "onnx":
        try:
            program = torch.onnx.export(model, (example,), dynamo=True, verbose=False, input_names=["images"],
                                        output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},))
        except ImportError as exc:
            raise RunError(f"ONNX export needs onnx and onnxscript: pip install '.[export]' ({exc})") from exc
        program.save(str(out))
    else:
        raise RunError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    meta = {
        "format": fmt, "model": loaded.config.model.name, "checkpoint": str(loaded.checkpoint), "ema": loaded.ema,
        "classes": loaded.classes, "image_size": size,
        "eval_resize": eval_resize_for(size, loaded.config.data.eval_resize),
        "input": f"float32 [N, 3, {size}, {size}] RGB: pixels / 255, then (x - mean) / std per channel",
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "output": "logits [N, classes]",
        "builds_with": torchvision_constructor(loaded),
        # what rebuilding the model needs (torch.hub's entry points, pipeline/inference/hub.py)
        "num_classes": len(loaded.classes), "aux_logits": loaded.config.model.aux_logits,
        "transform_input": bool(getattr(loaded.model, "transform_input", False)), "dropout": loaded.config.model.dropout,
    }
    Path(f"{out}.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m pipeline.inference.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="run directory (its best checkpoint) or checkpoint directory")
    parser.add_argument("--format", required=True, choices=tuple(FORMATS))
    parser.add_argument("--ema", action="store_true", help="the EMA weights (runs trained with ema.enabled)")
    parser.add_argument("--out", help="output file (default: RUN/export/MODEL-step-N.{pth,pt,onnx})")
    args = parser.parse_args(argv)
    try:
        loaded = load_model(args.checkpoint, "best", args.ema)
        out = export(loaded, args.format, Path(args.out) if args.out else default_out(loaded, args.format))
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"{loaded.description} -> {out} ({args.format}); metadata in {out}.json")
    if args.format == "state_dict":
        print(f"load it with: {torchvision_constructor(loaded)}.load_state_dict(torch.load({str(out)!r}))")
    return out


if __name__ == "__main__":
    main()
