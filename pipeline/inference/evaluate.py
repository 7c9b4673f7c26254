"""Top-1/top-5 error with the paper's test protocol (Table 3): 1, 10 or 144 crops, ensembles.

    python -m pipeline.inference.evaluate --run runs/demo [--checkpoint best|last|PATH] [--ema] [--crops 1|10|144]
    python -m pipeline.inference.evaluate --run runs/a --runs runs/b runs/c --crops 144        # an ensemble
    accelerate launch --multi_gpu --num_processes 8 -m pipeline.inference.evaluate --run runs/a --crops 144
    python -m pipeline.inference.evaluate --config configs/imagenet_bn.yaml model.weights=FILE data.dir=DIR

Softmax is averaged over the crops of an image, then over the models (paper, section 7). The
loader workers decode each image once and cut all its crops; the device runs them in batches of
``--batch-size`` crops. Besides the requested models x crops, the 1-model/1-crop base (the
trainer's validation transform, first model) is always computed, so the table's comparison is
measured, not quoted. Errors come from counts all-reduced over the processes, and the total is
checked against the manifest.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object
from tqdm import tqdm

from imaging.crops import eval_resize_for
from pipeline.config import ConfigError, load_config
from pipeline.data.batches import make_loader
from pipeline.data.prepared import (
    BadSampleError,
    PreparedData,
    RemoteOptions,
    bad_sample_message,
    equal_ranges,
    open_prepared,
)
from pipeline.models import forward_with_aux
from pipeline.ops.launch import on_every_rank
from pipeline.train.metrics import Tally
from shards.manifest import PrepError
from shards.store import StoreError, error_line, redact

from .crop_stream import CropStream
from .multi_crop import CROP_COUNTS, network_input
from .run_files import CHECKPOINT_CHOICES, LoadedModel, RunError, data_directory, load_initial_model, load_model

COLUMNS = ("Number of models", "Number of crops", "Cost", "Top-1 error", "Top-5 error", "Compared to base")


def average_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Logits [models, images, crops, classes] -> probabilities [images, classes]: the softmax of
    every crop, averaged over the crops, then over the models."""
    return logits.float().softmax(dim=-1).mean(dim=2).mean(dim=0)


def table_rows(models: int, crops: int) -> list[tuple[int, int]]:
    """(models, crops) rows, as the paper's Table 3: the 1-model/1-crop base first."""
    rows = [(1, 1), (1, crops), (models, 1), (models, crops)]
    return list(dict.fromkeys(rows))


def row_logits(logits: torch.Tensor, models: int, crops: int) -> torch.Tensor:
    """The part of [models, images, 1 (+ crops), classes] that a row averages: the first model
    or all, the centre crop (position 0) or the test-time crops (positions 1...)."""
    return logits[:models, :, :1] if crops == 1 else logits[:models, :, 1:]


def check_compatible(loaded: list[LoadedModel], data: PreparedData) -> None:
    """An ensemble shares one set of crops and one class list, which must be the data's."""
    first = loaded[0]
    size = (first.config.data.image_size, eval_resize_for(first.config.data.image_size, first.config.data.eval_resize))
    ids = [c["id"] for c in first.classes]
    for other in loaded[1:]:
        other_size = (other.config.data.image_size,
                      eval_resize_for(other.config.data.image_size, other.config.data.eval_resize))
        if other_size != size:
            raise RunError(f"{other.run_dir}: data.image_size/eval_resize {other_size} differ from {first.run_dir}'s "
                           f"{size}; the models of an ensemble are evaluated on the same crops")
        if [c["id"] for c in other.classes] != ids:
            raise RunError(f"{other.run_dir}: its {len(other.classes)} classes are not those of {first.run_dir} "
                           f"({len(ids)} classes); the models of an ensemble must have the same classes")
    data_ids = [c["id"] for c in data.classes]
    if data_ids != ids:
        raise RunError(f"{data.directory}: its {len(data_ids)} classes are not the {len(ids)} classes the models "
                       f"were trained on ({first.run_dir or first.config.model.weights})")


def _forward(models: list[LoadedModel], stacks: torch.Tensor, batch_size: int, accelerator) -> torch.Tensor:
    """uint8 crops [N, S, S, 3] on the device -> logits [models, N, classes], in chunks of
    ``batch_size`` crops, each chunk normalised once for all the models."""
    outputs: list[list[torch.Tensor]] = [[] for _ in models]
    for chunk in stacks.split(batch_size):
        inputs = network_input(chunk)
        for loaded, out in zip(models, outputs):
            x = inputs.contiguous(memory_format=torch.channels_last) if loaded.config.model.channels_last else inputs
            with accelerator.autocast():
                out.append(forward_with_aux(loaded.model, x).logits.float())
    return torch.stack([torch.cat(out) for out in outputs])


@torch.inference_mode()
def evaluate(models: list[LoadedModel], data: PreparedData, crops: int, accelerator, batch_size: int = 512,
             workers: int = 2) -> dict:
    """Errors of every ``table_rows`` row over the whole validation split (every process calls this)."""
    check_compatible(models, data)
    acc = accelerator
    config = models[0].config
    image_size, eval_resize = config.data.image_size, eval_resize_for(config.data.image_size, config.data.eval_resize)
    per_image = 1 if crops == 1 else 1 + crops  # the trainer's centre crop, then the test-time crops
    stream = CropStream(data, crops=crops, image_size=image_size, eval_resize=eval_resize,
                        images_per_batch=max(1, batch_size // per_image), rank=acc.process_index,
                        world_size=acc.num_processes)
    rows = table_rows(len(models), crops)
    tallies = {row: Tally() for row in rows}
    slots = max(1, workers)
    ranges = equal_ranges(data.val_samples, acc.num_processes * slots)[acc.process_index * slots:][:slots]
    bar = tqdm(total=sum(b - a for a, b in ranges), unit="img", desc=f"{crops} crop{'s' * (crops > 1)}",
               disable=not acc.is_main_process, file=sys.stderr, dynamic_ncols=True)
    started = time.perf_counter()
    unreadable = []
    for stacks, labels, skipped in make_loader(stream, workers, acc.device.type == "cuda"):
        unreadable += skipped
        n = labels.numel()
        if unreadable or not n:
            continue  # the evaluation stops below, on every process alike
        stacks = stacks.to(acc.device, non_blocking=True).flatten(0, 1)
        labels = labels.to(acc.device)
        logits = _forward(models, stacks, batch_size, acc).view(len(models), n, per_image, -1)
        for row in rows:
            probs = average_probabilities(row_logits(logits, *row))
            nll = -probs.gather(1, labels[:, None]).clamp_min(1e-12).log().sum()
            tallies[row].add(probs, labels, nll)
        bar.update(n)
    bar.close()
    unreadable = gather_object(unreadable)
    if unreadable:  # the paper's protocol counts every validation image: no skipping
        raise on_every_rank(BadSampleError(bad_sample_message(unreadable[0], data.directory)))
    results = []
    base = None
    for row in rows:
        total = tallies[row].reduce(acc)
        if total.count != data.val_samples:
            raise RuntimeError(f"evaluation counted {total.count} samples, the manifest of {data.directory} says "
                               f"{data.val_samples}")
        errors = total.errors()
        base = base or errors
        results.append({"models": row[0], "crops": row[1], "cost": row[0] * row[1],
                        "top1_error": errors["top1_error"], "top5_error": errors["top5_error"], "loss": errors["loss"],
                        "top1_change": errors["top1_error"] - base["top1_error"],
                        "top5_change": errors["top5_error"] - base["top5_error"]})
    seconds = time.perf_counter() - started
    return {
        "models": [{"description": m.description, "model": m.config.model.name,
                    "run": str(m.run_dir) if m.run_dir else None,
                    "checkpoint": str(m.checkpoint) if m.checkpoint else None, "ema": m.ema} for m in models],
        "data": redact(str(data.directory)), "val_samples": data.val_samples, "image_size": image_size,
        "eval_resize": eval_resize, "crops": crops, "processes": acc.num_processes,
        "device": acc.device.type, "mixed_precision": acc.mixed_precision, "seconds": seconds,
        "images_per_sec": data.val_samples / seconds,
        "crops_per_sec": data.val_samples * per_image * len(models) / seconds,
        "rows": results,
    }


def format_table(result: dict) -> str:
    """The rows in the form of the paper's Table 3 (errors in %, change of the top-5 error)."""
    lines = []
    for i, row in enumerate(result["rows"]):
        change = "base" if i == 0 else f"{100 * row['top5_change']:+.2f}%"
        lines.append((str(row["models"]), str(row["crops"]), str(row["cost"]),
                      f"{100 * row['top1_error']:.2f}%", f"{100 * row['top5_error']:.2f}%", change))
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(COLUMNS)]

    def fmt(cells):
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([fmt(COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, lines)])


def default_out(models: list[LoadedModel], crops: int) -> Path:
    first = models[0]
    directory = first.run_dir or first.config.run_dir
    name = f"eval-{crops}crops" if len(models) == 1 else f"eval-{len(models)}models-{crops}crops"
    return directory / (name + ("-ema" if first.ema else "") + ".json")


def _load_models(args, device) -> list[LoadedModel]:
    if args.config:
        if args.run or args.runs or args.ema:
            raise RunError("--config evaluates the model a recipe starts from; it takes no --run, --runs or --ema")
        return [load_initial_model(load_config(args.config, args.overrides), device)]
    if args.overrides:
        raise RunError(f"unexpected arguments {args.overrides} (key=value overrides go with --config)")
    sources = ([args.run] if args.run else []) + list(args.runs or [])
    which = args.checkpoint
    if not sources and which not in CHECKPOINT_CHOICES:
        sources, which = [which], "best"  # a checkpoint directory on its own
    if not sources:
        raise RunError("nothing to evaluate: give --run RUN (or --runs, --checkpoint PATH, --config)")
    return [load_model(source, which, args.ema, device) for source in sources]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.inference.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="run directory (runs/NAME) or checkpoint directory")
    parser.add_argument("--runs", nargs="+", metavar="RUN", help="more runs or checkpoint directories: an ensemble")
    parser.add_argument("--checkpoint", default="best",
                        help="best (default; the newest if the run never evaluated), last, or a checkpoint directory")
    parser.add_argument("--ema", action="store_true", help="the EMA weights (runs trained with ema.enabled)")
    parser.add_argument("--crops", type=int, choices=CROP_COUNTS, default=1, help="crops per image (default 1)")
    parser.add_argument("--data", help="prepared data: a directory or an s3://, gs://, https:// prefix "
                        "(default: the first run's data.dir)")
    parser.add_argument("--batch-size", type=int, default=512, help="crops per forward pass (default 512)")
    parser.add_argument("--workers", type=int, help="loader workers per process (default: the run's data.workers)")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"),
                        help="default: the first run's train.mixed_precision")
    parser.add_argument("--out", help="JSON file (default: RUN/eval-<crops>crops.json)")
    parser.add_argument("--config", help="a recipe with model.weights: evaluate the weights the trainer starts from")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for --config")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or (args.workers is not None and args.workers < 0):
        parser.error("--batch-size must be >= 1 and --workers >= 0")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    try:
        from pipeline.ops.launch import LaunchError, make_accelerator

        models = _load_models(args, "cpu")
        config = models[0].config
        data = open_prepared(args.data or data_directory(config), RemoteOptions.from_config(config.data))
        check_compatible(models, data)  # before the process group: a mistake costs no launch
        mixed_precision = args.mixed_precision or config.train.mixed_precision
        try:
            accelerator = make_accelerator(
                dataclasses.replace(config, train=dataclasses.replace(config.train, mixed_precision=mixed_precision)))
        except LaunchError as exc:
            raise ConfigError(str(exc)) from exc
        for loaded in models:
            loaded.model.to(accelerator.device)
            if loaded.config.model.channels_last:
                loaded.model.to(memory_format=torch.channels_last)
        workers = config.data.workers if args.workers is None else args.workers
        result = evaluate(models, data, args.crops, accelerator, args.batch_size, workers)
    except (ConfigError, PrepError, RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except StoreError as exc:
        print(f"error: {error_line(exc)}", file=sys.stderr)
        sys.exit(3)
    except BadSampleError as exc:  # raised alike on every process: the main one says it
        if accelerator.is_main_process:
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(3)
    if accelerator.is_main_process:
        out = Path(args.out) if args.out else default_out(models, args.crops)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        for m in models:
            print(f"model: {m.description}", file=sys.stderr)
        print(format_table(result))
        print(f"{data.val_samples} images of {data.directory}, {result['processes']} processes on "
              f"{result['device']}, {result['images_per_sec']:.1f} images/s ({result['crops_per_sec']:.0f} crops/s); "
              f"written to {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
