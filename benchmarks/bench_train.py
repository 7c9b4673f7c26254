"""Training throughput on one device: this project's training step against torchvision's
reference recipe on the same batch in the same run, and the whole trainer end to end from
JPEG shards.

    python benchmarks/bench_train.py [--batch 256] [--size 224] [--steps 50] [--warmup 20]
                                     [--no-compile] [--shards DIR | --synthetic-per-class 2000] [--epochs 3]
                                     [--peak-tflops 989] [--smoke] [--json FILE] [--keep-run DIR] [--log-every N]

Rows of the table (every one a forward, backward and SGD step on ``--batch`` images of
``--size`` pixels, 1,000 classes):
- ``googlenet_bn``: this project's batch-norm GoogLeNet as ``configs/imagenet_bn.yaml`` trains
  it, device-resident (one uint8 batch kept on the device, as the loader delivers it): the
  trainer's own step (``pipeline.data.device_augment``: photometric distortion and normalisation on
  the device; ``pipeline.train.step``: bf16 autocast, channels_last, loss of all heads, the trainer's top-k tally, fused SGD,
  the EMA every ``ema.every`` updates),
  compiled with torch.compile on CUDA unless ``--no-compile``;
- ``googlenet (paper)``: the paper's GoogLeNet (LRN, no batch norm) the same way, bf16;
- ``torchvision reference``: ``torchvision.models.googlenet(aux_logits=True, init_weights=True)``
  run as torchvision's ``references/classification/train.py`` runs a batch: a normalised float
  NCHW batch, fp16 autocast with a GradScaler (on CUDA; float32 on a CPU), eager, SGD with
  momentum, ``loss.item()`` and top-1/top-5 ``.item()`` for its metric logger every step; the
  auxiliary heads' losses weighted 0.3 as in the paper;
- ``end to end``: ``train.py --config configs/imagenet_bn.yaml`` (compiled as above) on prepared
  JPEG shards (``--shards``, or synthetic ILSVRC-like JPEGs prepared here) for ``--epochs``
  epochs with a validation pass after each; its rate is the images trained after the first
  epoch over the wall time from the end of the first epoch's validation to the end of the
  last's, so that every later epoch boundary and validation pass is counted.

Columns: img/s; ``x ref``, the ratio to the torchvision reference; ``of device``, the ratio to
the device-resident ``googlenet_bn`` row; TFLOP/s, from the FLOPs of one training step counted
with ``torch.utils.flop_counter.FlopCounterMode``; MFU, TFLOP/s over the device's dense bf16
peak (989 TFLOP/s for an H100 SXM; ``--peak-tflops`` for another device; n/a on a CPU);
the fraction of the time spent waiting for data (end to end only) and the peak device memory.

``--smoke`` (the default without CUDA) runs tiny sizes in well under a minute on a CPU: it
checks the harness, not the speed. ``--keep-run DIR`` keeps the end-to-end run (``DIR/bench``: its
metrics.jsonl and TensorBoard logs, with a throughput point every ``--log-every`` updates).
``--json`` is written once the device-resident rows are measured, and again at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from imaging.photometric import normalize  # noqa: E402
from imaging.specs import PhotometricSpec  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.device_augment import DeviceInput  # noqa: E402
from pipeline.data.prepared import IGNORE_LABEL  # noqa: E402
from pipeline.ops.launch import make_accelerator  # noqa: E402
from pipeline.train.ema import update_ema  # noqa: E402
from pipeline.train.metrics import Tally  # noqa: E402
from pipeline.train.recipe import build_optimizer, scaled_lr  # noqa: E402
from pipeline.train.run import build_network  # noqa: E402
from pipeline.train.schedule import build_scheduler  # noqa: E402
from pipeline.train.step import compute_loss, optimizer_step  # noqa: E402

H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM
REFERENCE = "torchvision reference"
DEVICE_RESIDENT = "googlenet_bn"


@dataclass
class Row:
    name: str
    images_per_sec: float
    tflops: float  # achieved
    peak_memory_gib: float | None = None  # None: not measured (CPU)
    data_wait: float | None = None  # None: no loader (device-resident)
    vs_reference: float | None = None
    of_device_resident: float | None = None
    mfu: float | None = None


# ----------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def step_flops(step, *args) -> int:
    """FLOPs of one call of ``step`` (forward and backward), counted by torch's FLOP counter."""
    with FlopCounterMode(display=False) as counter:
        step(*args)
    return counter.get_total_flops()


def measure(name: str, step, make_args, flops_step, batch: int, warmup: int, steps: int,
            device: torch.device) -> Row:
    """Images per second over ``steps`` calls of ``step`` after ``warmup`` (compilation, cuDNN's
    autotuning), and the achieved TFLOP/s from the FLOPs of one eager step."""
    flops = step_flops(flops_step, *make_args(-1))
    reset_memory(device)
    for i in range(warmup):
        step(*make_args(i))
    synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        step(*make_args(warmup + i))
    synchronize(device)
    seconds = time.perf_counter() - start
    return Row(name, batch * steps / seconds, flops * steps / seconds / 1e12, peak_memory(device))


# ----------------------------------------------------------------------------------------- contestants
def project_row(name: str, config_file: str, args, device: torch.device, accelerator) -> Row:
    """The trainer's step on a device-resident uint8 batch, the recipe's model, loss and optimizer."""
    config = load_config(ROOT / "configs" / config_file, [
        f"data.image_size={args.size}", f"data.batch_size={args.batch}", "train.mixed_precision=bf16",
        "model.channels_last=true", f"model.compile={str(args.compile).lower()}",
    ])
    c = config
    bare = build_network(c, args.classes)
    optimizer = build_optimizer(bare, scaled_lr(c.optim, args.batch), c.optim, fused=device.type == "cuda")
    scheduler = build_scheduler(optimizer, c.schedule, updates_per_epoch=1000)
    compile_mode = c.model.compile_mode if c.model.compile and device.type == "cuda" else None
    model = torch.compile(bare, mode=compile_mode) if compile_mode else bare
    model, optimizer = accelerator.prepare(model, optimizer)  # also moves ``bare``, which the compiled model wraps
    a = c.data.augment
    photometric = PhotometricSpec(*(tuple(r) if r else None for r in (a.brightness, a.contrast, a.saturation)),
                                          a.random_order, a.lighting_std)
    inputs_for = {mode: DeviceInput(device, channels_last=True, mixed_precision="bf16", photometric=photometric,
                                    compile_mode=mode) for mode in {compile_mode, None}}
    # As the loader delivers a batch: uint8 [N,3,H,W] over HWC memory (channels_last).
    images = torch.randint(0, 256, (args.batch, args.size, args.size, 3), dtype=torch.uint8, device=device)
    images = images.permute(0, 3, 1, 2)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    tally = Tally()
    ema = AveragedModel(bare, multi_avg_fn=get_ema_multi_avg_fn(0.9999), use_buffers=True) if c.ema.enabled else None
    updates = 0

    def step(net, device_input, generator):
        nonlocal updates
        torch.manual_seed(updates)  # dropout, reseeded per micro-batch as the trainer does
        inputs = device_input(images, generator)
        with accelerator.autocast():
            loss, logits, losses = compute_loss(net, inputs, labels, c.model.aux_weight, c.optim.label_smoothing)
        accelerator.backward(loss)
        labelled = labels.ne(IGNORE_LABEL).sum()
        tally.add_counts(Tally.counts(logits.detach().float(), labels, losses[0] * labelled))
        optimizer_step(accelerator, net, optimizer, scheduler, c.optim.clip_grad_norm)
        updates += 1
        if ema is not None and updates % c.ema.every == 0:
            update_ema(ema, bare, 0.9999)

    model.train()
    # FLOPs are counted on the eager model and transform (the same arithmetic, countable).
    row = measure(name, step, lambda i: (model, inputs_for[compile_mode], torch.Generator().manual_seed(i + 1)),
                  lambda net, device_input, g: step(bare, inputs_for[None], g), args.batch, args.warmup, args.steps,
                  device)
    tally.errors()  # read once at the end, as a log line would
    return row


def reference_row(args, device: torch.device) -> Row:
    """torchvision's GoogLeNet as torchvision's references/classification/train.py trains it."""
    torch.manual_seed(0)
    model = torchvision.models.googlenet(aux_logits=True, init_weights=True, num_classes=args.classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    amp = device.type == "cuda"  # train.py --amp: fp16 autocast and a GradScaler
    scaler = torch.amp.GradScaler("cuda") if amp else None
    images = torch.rand(args.batch, 3, args.size, args.size, device=device)
    images = normalize(images)  # its loader hands over normalised float32 NCHW batches
    labels = torch.randint(0, args.classes, (args.batch,), device=device)

    def step(image, target):
        image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            out = model(image)
            loss = F.cross_entropy(out.logits, target) + 0.3 * (F.cross_entropy(out.aux_logits1, target)
                                                                + F.cross_entropy(out.aux_logits2, target))
        optimizer.zero_grad()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        top5 = out.logits.topk(5, dim=1).indices.eq(target[:, None])  # utils.accuracy, then the logger's .item()s
        loss.item(), top5[:, :1].any(dim=1).float().mean().item(), top5.any(dim=1).float().mean().item()

    model.train()
    name = REFERENCE + (" (fp16)" if amp else " (fp32)")
    return measure(name, step, lambda i: (images, labels), step, args.batch, args.warmup, args.steps, device)


def prepare_shards(root: Path, args) -> Path:
    """Synthetic ILSVRC-like JPEGs (full-size photos' sides, not pre-resized) prepared into
    shards, as a user would; their messages go to stderr, the table alone to stdout."""
    from data_prep.plan import PrepParams
    from data_prep.synthetic import SyntheticSpec, generate
    from data_prep.writer import run

    spec = (SyntheticSpec(num_classes=4, train_per_class=16, val_per_class=4, min_side=40, max_side=72, seed=1)
            if args.smoke else SyntheticSpec(num_classes=10, train_per_class=args.synthetic_per_class,
                                             val_per_class=max(1, args.synthetic_per_class // 10), min_side=333,
                                             max_side=500, seed=1))
    images = root / "images"
    workers = max(1, len(os.sched_getaffinity(0)))
    with contextlib.redirect_stdout(sys.stderr):
        generate(images, spec, workers=workers)
        params = PrepParams(train=str(images / "train"), val=str(images / "val"),
                            val_labels=str(images / "val_labels.txt"), class_names=str(images / "LOC_synset_mapping.txt"),
                            shard_size=16 if args.smoke else 1000)
        run(params, root / "shards", workers=workers)
    return root / "shards"


def end_to_end_row(args, shards: Path, out: Path, flops_per_image: float) -> Row:
    """``train.py`` on the shards for ``--epochs`` epochs; the rate from its metrics.jsonl."""
    overrides = [f"data.dir={shards}", f"output_dir={out}", "name=bench", f"data.image_size={args.size}",
                 f"data.batch_size={args.batch}", f"schedule.epochs={args.epochs}", "schedule.warmup_epochs=0",
                 "train.image_grid=false", "train.checkpoint_every_steps=0", "train.keep_checkpoints=1",
                 f"model.compile={str(args.compile).lower()}"]
    if args.smoke:
        overrides += ["data.workers=1", "data.shuffle_buffer=8", "data.eval_resize=36", "train.log_every_steps=4",
                      "train.mixed_precision=bf16"]
    if args.log_every:
        overrides.append(f"train.log_every_steps={args.log_every}")
    command = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/imagenet_bn.yaml"), *overrides]
    result = subprocess.run(command, cwd=out, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"end-to-end training failed:\n{result.stderr[-4000:]}")
    records = [json.loads(line) for line in (out / "bench" / "metrics.jsonl").read_text().splitlines()]
    if len(records) < 2:
        raise RuntimeError(f"end to end: {len(records)} epoch records; need --epochs >= 2")
    later = records[1:]
    images = sum(r["train_samples"] for r in later)
    rate = images / (later[-1]["wall_time"] - records[0]["wall_time"])
    wait = sum(r["data_wait_fraction"] for r in later) / len(later)
    memory = max((r["peak_gpu_gib"] for r in records if "peak_gpu_gib" in r), default=None)
    return Row(f"end to end ({args.epochs} epochs, shards)", rate, rate * flops_per_image / 1e12, memory, wait)


# ----------------------------------------------------------------------------------------- table
def fill_ratios(rows: list[Row], peak_tflops: float | None) -> None:
    reference = next(r for r in rows if r.name.startswith(REFERENCE))
    device_resident = next(r for r in rows if r.name.startswith(DEVICE_RESIDENT))
    for row in rows:
        row.vs_reference = row.images_per_sec / reference.images_per_sec
        row.of_device_resident = row.images_per_sec / device_resident.images_per_sec
        row.mfu = row.tflops / peak_tflops if peak_tflops else None


def table(rows: list[Row], device_name: str, peak_tflops: float | None, batch: int, size: int) -> str:
    def fmt(value, spec, missing="-"):
        return missing if value is None else format(value, spec)

    header = f"{'':42} {'img/s':>9} {'x ref':>6} {'of device':>9} {'TFLOP/s':>8} {'MFU':>6} {'data wait':>9} {'peak GiB':>8}"
    lines = [f"{device_name}, batch {batch}, {size} px; MFU against "
             + (f"{peak_tflops:g} TFLOP/s" if peak_tflops else "no stated peak (n/a)"), header]
    for r in rows:
        lines.append(f"{r.name:42} {r.images_per_sec:9.1f} {r.vs_reference:6.2f} {r.of_device_resident:9.2f} "
                     f"{r.tflops:8.3f} {fmt(r.mfu, '6.1%', 'n/a'):>6} {fmt(r.data_wait, '9.3f'):>9} "
                     f"{fmt(r.peak_memory_gib, '8.2f'):>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per device-resident row")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (compilation, cuDNN autotuning)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager, also end to end")
    parser.add_argument("--shards", type=Path, help="prepared JPEG shards for the end-to-end row")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--synthetic-per-class", type=int, default=2000,
                        help="without --shards: training JPEGs per class (10 classes) prepared for the end-to-end row")
    parser.add_argument("--no-end-to-end", dest="end_to_end", action="store_false")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: 989 on an H100)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the default without CUDA)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--keep-run", type=Path, help="run the end-to-end training in DIR/bench and keep it")
    parser.add_argument("--log-every", type=int, help="the end-to-end run's train.log_every_steps")
    args = parser.parse_args(argv)
    if args.keep_run and (args.keep_run / "bench").exists():  # train.py would resume it
        parser.error(f"{args.keep_run / 'bench'} exists: remove it or keep the run elsewhere")
    cuda = torch.cuda.is_available()
    if args.smoke or not cuda:
        args.smoke = True
        args.batch, args.size, args.classes, args.steps, args.warmup = 8, 32, 10, 3, 1
        args.compile = args.compile and cuda
    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    peak = args.peak_tflops or (H100_BF16_TFLOPS if "H100" in device_name else None)

    # One Accelerator, as the trainer's: cuDNN autotuning, bf16 autocast, the CPU's threads.
    accelerator = make_accelerator(load_config(None, ["train.mixed_precision=bf16", "output_dir=" + tempfile.gettempdir()]))
    device = accelerator.device
    rows = [reference_row(args, device),
            project_row(f"{DEVICE_RESIDENT} (bf16, channels_last{', compiled' if args.compile else ''})",
                        "imagenet_bn.yaml", args, device, accelerator),
            project_row(f"googlenet (paper) (bf16{', compiled' if args.compile else ''})", "imagenet_paper.yaml",
                        args, device, accelerator)]

    def write_json():
        fill_ratios(rows, peak)
        if args.json:
            args.json.write_text(json.dumps({"device": device_name, "peak_tflops": peak, "batch": args.batch,
                                             "size": args.size, "rows": [asdict(r) for r in rows]}, indent=1))

    write_json()  # the device-resident rows, kept should the end-to-end run be cut short
    if args.end_to_end:
        flops_per_image = rows[1].tflops * 1e12 / rows[1].images_per_sec
        with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
            tmp = Path(tmp)
            shards = args.shards or prepare_shards(tmp / "data", args)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the training process gets the device's memory
            run = args.keep_run or tmp / "run"
            run.mkdir(parents=True, exist_ok=True)
            rows.append(end_to_end_row(args, shards, run.resolve(), flops_per_image))
    write_json()
    print(table(rows, device_name, peak, args.batch, args.size))
    return rows


if __name__ == "__main__":
    main()
