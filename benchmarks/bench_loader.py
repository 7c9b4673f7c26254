"""Training-loader throughput: this project's WebDataset path against torchvision's
ImageFolder + PIL pipeline, with the same augmentation, images, batch size and workers, in
one run.

    python benchmarks/bench_loader.py --src DIR [--replicate N] [--size 224] [--workers 2] [--batches 40]

Both sides do the paper's crop (area 8-100%, aspect 3/4-4/3), flip and photometric
distortion (brightness, contrast, saturation 0.5-1.5) and normalise, ending with a float
batch ready for the model:
- reference: ``ImageFolder`` + ``RandomResizedCrop`` + ``RandomHorizontalFlip`` +
  ``ColorJitter`` + ``ToTensor`` + ``Normalize`` per image in the loader workers;
- pipeline: shards prepared from the same files (outside the timing), ``TrainStream`` workers
  decode (at reduced JPEG scale when possible) and crop into uint8; the photometric distortion
  runs where the trainer runs it: batched on the GPU (``--device cuda``), or per image in the
  loader workers on a CPU-only machine; normalisation in the main process.
Prints images/s for each and the ratio, best of ``--repeats`` passes each.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_prep import stage  # noqa: E402
from data_prep import augment  # noqa: E402
from data_prep.plan import PrepParams  # noqa: E402
from data_prep.writer import run as prepare  # noqa: E402
from pipeline.data import TrainStream, make_loader, open_prepared  # noqa: E402


def reference_loader(folder: Path, size: int, batch_size: int, workers: int) -> DataLoader:
    transform = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
        transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5),
        transforms.ToTensor(),
        transforms.Normalize(augment.IMAGENET_MEAN, augment.IMAGENET_STD),
    ])
    dataset = datasets.ImageFolder(str(folder), transform=transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                      persistent_workers=False, prefetch_factor=4 if workers else None)


def timed(batches, count: int, finish) -> float:
    """Images per second over ``count`` batches, after one warm-up batch (worker start-up)."""
    iterator = iter(batches)
    finish(next(iterator)[0])
    images = 0
    start = time.perf_counter()
    for _ in range(count):
        x = finish(next(iterator)[0])
        images += len(x)
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True)
    parser.add_argument("--replicate", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        files = stage(args.src, args.replicate, work / "images")
        images = str(work / "images")  # validation = training images: only the training loader is timed
        prepare(PrepParams(train=images, val=images, shard_size=256), work / "shards", workers=args.workers)
        data = open_prepared(work / "shards")
        needed = (args.batches + 1) * args.batch_size
        if needed > len(files):
            raise SystemExit(f"{len(files)} images are fewer than {needed} needed: raise --replicate")
        device = torch.device(args.device)
        photometric = augment.PhotometricSpec()

        on_gpu = device.type == "cuda"

        def device_side(x: torch.Tensor) -> torch.Tensor:
            x = x.to(device, non_blocking=True)
            x = augment.photometric_distort(x, photometric) if on_gpu else x.float().div_(255)
            x = augment.normalize(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return x

        def reference_side(x: torch.Tensor) -> torch.Tensor:
            x = x.to(device, non_blocking=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return x

        stream = TrainStream(data.train, batch_size=args.batch_size, batches_per_epoch=len(files) // args.batch_size,
                             rank=0, world_size=1, seed=0, image_size=args.size, crop=augment.CropSpec(), baked=False,
                             shuffle_buffer=1000, eval_resize=round(args.size * 256 / 224),
                             photometric=None if on_gpu else photometric)
        results = {"reference": 0.0, "pipeline": 0.0}
        for repeat in range(args.repeats):
            ref = reference_loader(work / "images", args.size, args.batch_size, args.workers)
            results["reference"] = max(results["reference"], timed(ref, args.batches, reference_side))
            stream.set_epoch(repeat)
            ours = make_loader(stream, args.workers, pin_memory=device.type == "cuda")
            results["pipeline"] = max(results["pipeline"], timed(ours, args.batches, device_side))
        print(f"{len(files)} images from {args.src} (x{args.replicate}), {args.size}px crops, batch {args.batch_size}, "
              f"{args.workers} workers, photometric {'batched on the GPU' if on_gpu else 'in the loader workers'}")
        print(f"{'torchvision ImageFolder + PIL':34s} {results['reference']:8.0f} img/s   1.00x")
        print(f"{'WebDataset shards (this project)':34s} {results['pipeline']:8.0f} img/s   "
              f"{results['pipeline'] / results['reference']:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
