"""Classify image files with a trained model: the top classes, their names and probabilities.

    python -m pipeline.inference.predict --checkpoint runs/demo IMAGE...
    python -m pipeline.inference.predict --checkpoint runs/demo/checkpoints/step-00000420 --json --crops 10 a.jpg b.png

The images go through the trainer's validation transform (or the 10 or 144 test-time crops of
``pipeline.inference.evaluate``), on the GPU when there is one.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from imaging.crops import eval_resize_for
from pipeline.models import forward_with_aux

from .evaluate import average_probabilities
from .multi_crop import CROP_COUNTS, image_crops, network_input
from .run_files import LoadedModel, RunError, load_model


@torch.inference_mode()
def predict(loaded: LoadedModel, images: list[str | Path], crops: int = 1, top: int = 5,
            batch_size: int = 256) -> list[dict]:
    """For each image file, its ``top`` classes (index, id, name, probability), best first."""
    config = loaded.config
    size, resize = config.data.image_size, eval_resize_for(config.data.image_size, config.data.eval_resize)
    device = next(loaded.model.parameters()).device
    stacks = []
    for path in images:
        try:
            with Image.open(path) as image:
                stacks.append(image_crops(image, crops, size, resize))
        except (OSError, ValueError) as exc:
            raise RunError(f"{path}: cannot read the image ({exc})") from exc
    batch = torch.cat(stacks)
    logits = torch.cat([
        forward_with_aux(loaded.model, network_input(chunk.to(device))).logits.float().cpu()
        for chunk in batch.split(batch_size)
    ])
    probs = average_probabilities(logits.view(1, len(images), crops, -1))
    values, indices = probs.topk(min(top, probs.shape[1]), dim=1)
    results = []
    for path, p, idx in zip(images, values.tolist(), indices.tolist()):
        results.append({"image": str(path), "top": [
            {"index": i, "id": loaded.classes[i]["id"], "name": loaded.classes[i]["name"], "probability": q}
            for i, q in zip(idx, p)
        ]})
    return results


def format_text(results: list[dict]) -> str:
    lines = []
    for result in results:
        lines.append(result["image"])
        for rank, c in enumerate(result["top"], start=1):
            lines.append(f"  {rank}. {100 * c['probability']:6.2f}%  {c['name']} ({c['id']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m pipeline.inference.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="run directory (its best checkpoint) or checkpoint directory")
    parser.add_argument("--ema", action="store_true", help="the EMA weights (runs trained with ema.enabled)")
    parser.add_argument("--crops", type=int, choices=CROP_COUNTS, default=1, help="crops per image (default 1)")
    parser.add_argument("--top", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda when there is a GPU, else cpu")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    args = parser.parse_args(argv)
    try:
        loaded = load_model(args.checkpoint, "best", args.ema, args.device)
        results = predict(loaded, args.images, args.crops, args.top)
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(results, indent=1) if args.json else format_text(results))
    return results


if __name__ == "__main__":
    main()
