"""Training-loader throughput: this project's WebDataset path, its FFCV path and its DALI path
against torchvision's ImageFolder + PIL pipeline, on the same images, batch size and worker
count, in one run.

    python benchmarks/bench_loader.py --src DIR [--replicate N] [--size 224] [--workers 2] [--batches 40]
                                      [--photometric] [--raw-pixels | --reencode] [--restart-markers] [--no-ffcv]
                                      [--no-dali | --dali-only] [--dali-variants] [--pixels]

Every contestant does the paper's crop (area 8-100%, aspect 3/4-4/3) and flip and ends with
a normalised float batch on the device (``--device``):
- reference: ``ImageFolder`` + ``RandomResizedCrop`` + ``RandomHorizontalFlip`` + ``ToTensor``
  + ``Normalize`` per image in DataLoader worker processes;
- WebDataset: shards prepared from the same files (outside the timing); ``TrainStream``
  worker processes decode (only the crop's region, at reduced JPEG scale when possible) and
  crop into uint8 (the shard loader); with ``--raw-pixels`` the shards hold raw pixels (for tiny images), with
  ``--reencode`` JPEGs re-encoded at quality 90 like FFCV's (``data_prep shards --reencode``),
  with ``--restart-markers`` JPEGs with a restart marker after every MCU (lossless), of which
  only the MCUs around the crop are decoded;
- FFCV: ``data_prep ffcv`` files from the same files with FFCV's ImageNet settings (512 px,
  half JPEG quality 90, half raw pixels), read by FFCV's ``Loader`` (its worker threads) with
  ``RandomResizedCropRGBImageDecoder`` and ``RandomHorizontalFlip``, as the trainer does;
- DALI: ``data.loader=dali`` (``pipeline.data.dali_input``) on the same shards: ``--workers``
  loader processes read them and draw the crops, DALI decodes each crop's region and resizes it
  with ``--workers`` threads, on the GPU with ``--device cuda`` (nvJPEG), else on DALI's CPU
  operators.
With ``--photometric``, brightness/contrast/saturation 0.5-1.5 are added where each path does
them: ``ColorJitter`` per image for the reference; for WebDataset and FFCV where the trainer
does (batched on the GPU; on a CPU-only machine per image in the WebDataset workers and
batched in the main process for FFCV and DALI). Prints images/s for each, best of ``--repeats``
passes, and the ratios to the reference, to FFCV and to DALI. ``--loaders-only`` leaves out the device
step (conversion, normalisation, batched photometric), which on a CPU-only machine otherwise
runs in the main process on the cores the loader workers need.

FFCV is timed in a separate (spawned) process: its loader starts numba's thread pool, and
forking the other contestants' DataLoader workers after that is unsafe ("Unable to join threads
to shut down before fork()"). DALI too, for its threads.

``--dali-variants``: DALI (with ``--loaders-only`` alone: its uint8 batches on the device) with
the hardware JPEG decoder's load at 0 and 1 (``data.dali_hw_decoder_load``; GPUs without one, and
the CPU, ignore it), decoding each crop's region or the whole image then cropping, with the
device memory its pipeline holds (CUDA). ``--pixels``: how much DALI's pixels differ from the
shard loader's for the same boxes, per interpolation and for the evaluation transform (mean
absolute difference in uint8 levels). ``--dali-only``: the DALI rows alone.
"""
from __future__ import annotations

import argparse
import itertools
import multiprocessing
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
from data_prep.plan import PrepParams  # noqa: E402
from data_prep.writer import run as prepare  # noqa: E402
from imaging import jpeg_region  # noqa: E402
from imaging.specs import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, CropSpec, PhotometricSpec  # noqa: E402
from pipeline.data.batches import kill_leftover_workers, make_loader  # noqa: E402
from pipeline.data.device_augment import DeviceInput  # noqa: E402
from pipeline.data.prepared import open_prepared  # noqa: E402
from pipeline.data.webdataset_input import EvalStream, TrainStream  # noqa: E402

REFERENCE, FFCV = "torchvision ImageFolder + PIL", "FFCV (this project's FFCV path)"
DALI = "DALI (data.loader=dali)"


def reference_loader(folder: Path, size: int, batch_size: int, workers: int, photometric: bool) -> DataLoader:
    transform = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
        transforms.RandomHorizontalFlip(),
        *([transforms.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5)] if photometric else []),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    dataset = datasets.ImageFolder(str(folder), transform=transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                      persistent_workers=False, prefetch_factor=4 if workers else None)


def ffcv_loader(beton: Path, size: int, batch_size: int, workers: int):
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage

    image = [RandomResizedCropRGBImageDecoder((size, size), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
             RandomHorizontalFlip(), ToTensor(), ToTorchImage()]
    return Loader(str(beton), batch_size=batch_size, num_workers=workers, order=OrderOption.RANDOM, os_cache=True,
                  drop_last=True, pipelines={"image": image, "label": [IntDecoder(), ToTensor()]})


def ffcv_rates(beton: Path, size: int, batch_size: int, workers: int, batches: int, repeats: int,
               batched_photometric: bool, device: str, loaders_only: bool) -> float:
    """FFCV's best rate over ``repeats`` passes; run in a process of its own (see above)."""
    ffcv = ffcv_loader(beton, size, batch_size, workers)
    finish = (lambda x: x) if loaders_only else device_finish(torch.device(device), batched_photometric)
    return max(timed(ffcv, batches, finish) for _ in range(repeats))


def device_finish(device: torch.device, batched_photometric: bool):
    """What the trainer does with a uint8 batch (``DeviceInput``): to the device, photometric (if
    batched there), normalise, in the channels_last float32 batch the model takes."""
    to_network = DeviceInput(device, channels_last=True, photometric=PhotometricSpec() if batched_photometric else None)
    generator = torch.Generator().manual_seed(0)

    def device_side(x: torch.Tensor) -> torch.Tensor:
        x = to_network(x, generator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return x
    return device_side


def dali_rates(shards: Path, size: int, batch_size: int, workers: int, batches: int, repeats: int,
               batched_photometric: bool, device: str, loaders_only: bool,
               variants: list[tuple[float, bool]]) -> list[tuple[float, float | None]]:
    """DALI's best rate over ``repeats`` passes, and the device memory (GiB) its pipeline holds
    (None on a CPU), for each (hardware decoder load, region decoding) of ``variants``; run in a
    process of its own (see above)."""
    from pipeline.data.dali_input import DaliInput

    device = torch.device(device)
    finish = device_finish(device, batched_photometric) if not loaders_only else synchronized(device)
    data = open_prepared(shards)
    found = []
    for load, region in variants:
        before = device_memory(device)
        dali = DaliInput(bench_stream(data, size, batch_size), data.val, eval_batch_size=batch_size,
                         eval_resize=round(size * 256 / 224), workers=workers, device=device, hw_decoder_load=load,
                         region=region)
        rate = max(timed(dali.train_batches(epoch), batches, finish) for epoch in range(repeats))
        after = device_memory(device)
        found.append((rate, None if before is None else (after - before) / 2**30))
        del dali
    return found


def synchronized(device: torch.device):
    """A batch as delivered (uint8), once the device has made it."""
    def finish(x: torch.Tensor) -> torch.Tensor:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return x
    return finish


def in_own_process(function, *args):
    """``function(*args)`` in a spawned process, not daemonic (DALI's loader starts worker processes)."""
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        results = manager.dict()
        process = context.Process(target=call_into, args=(results, function, *args))
        process.start()
        process.join()
        if "value" not in results:
            raise RuntimeError(f"{function.__name__} failed in its process: {results.get('error', process.exitcode)}")
        return results["value"]


def call_into(results, function, *args) -> None:
    try:
        results["value"] = function(*args)
    except Exception as exc:  # reported by in_own_process
        results["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        # Loader workers ignore SIGTERM, with which a child process's exit ends its children.
        kill_leftover_workers()


def device_memory(device: torch.device) -> float | None:
    """Bytes of the device's memory in use outside torch's allocator (DALI's, nvJPEG's); None on a CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device)


def bench_stream(data, size: int, batch_size: int, crop: CropSpec = CropSpec(), photometric=None) -> TrainStream:
    """The training stream every shard-reading contestant reads: seed 0, the whole set per epoch."""
    return TrainStream(data.train, batch_size=batch_size, batches_per_epoch=data.train_samples // batch_size,
                       rank=0, world_size=1, seed=0, image_size=size, crop=crop, baked=False,
                       shuffle_buffer=1000, eval_resize=round(size * 256 / 224), num_classes=data.num_classes,
                       photometric=photometric)


def pixel_differences(shards: Path, size: int, batch_size: int, batches: int) -> dict[str, float]:
    """Mean absolute difference (uint8 levels) of DALI's crops from the shard loader's, the same
    samples and boxes: per interpolation over ``batches`` batches, and for the evaluation transform."""
    from pipeline.data.dali_input import DaliInput

    data = open_prepared(shards)
    found = {}
    for name in INTERPOLATIONS + ("evaluation",):
        crop = CropSpec(interpolations=(name,)) if name in INTERPOLATIONS else CropSpec()
        stream = bench_stream(data, size, batch_size, crop)
        dali = DaliInput(bench_stream(data, size, batch_size, crop), data.val, eval_batch_size=batch_size,
                         eval_resize=round(size * 256 / 224), workers=0, device="cpu")
        stream.set_epoch(0)
        if name in INTERPOLATIONS:
            pairs = zip(make_loader(stream, 0, pin_memory=False), dali.train_batches(0))
        else:
            val = EvalStream(data.val, batch_size=batch_size, rank=0, world_size=1, image_size=size,
                             resize=round(size * 256 / 224), num_classes=data.num_classes)
            pairs = zip(make_loader(val, 0, pin_memory=False), dali.val_batches())
        differences = [(ours[0].int() - theirs[0].int()).abs().float().mean().item()
                       for ours, theirs in itertools.islice(pairs, batches)]
        found[name] = sum(differences) / len(differences)
    return found


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
    parser.add_argument("--photometric", action="store_true", help="add brightness/contrast/saturation")
    stored = parser.add_mutually_exclusive_group()
    stored.add_argument("--raw-pixels", action="store_true", help="shards hold raw pixels (data_prep shards --raw-pixels)")
    stored.add_argument("--reencode", action="store_true",
                        help="shards hold JPEGs re-encoded at quality 90, as FFCV's (data_prep shards --reencode)")
    parser.add_argument("--restart-markers", action="store_true",
                        help="JPEGs with a restart marker after every MCU (data_prep shards --restart-markers)")
    parser.add_argument("--no-ffcv", action="store_true", help="leave FFCV out (when it is not installed)")
    dali = parser.add_mutually_exclusive_group()
    dali.add_argument("--no-dali", action="store_true", help="leave DALI out (when it is not installed)")
    dali.add_argument("--dali-only", action="store_true", help="the DALI rows only")
    parser.add_argument("--dali-variants", action="store_true",
                        help="DALI alone with hardware decoder load 0 and 1, region and whole-image decoding")
    parser.add_argument("--pixels", action="store_true",
                        help="DALI's pixels against the shard loader's, per interpolation (mean absolute difference)")
    parser.add_argument("--loaders-only", action="store_true",
                        help="time each loader's batches as delivered (uint8 for this project and FFCV, normalised "
                        "float for the reference), without the device step: as on a GPU node, where that step is "
                        "GPU work; on a CPU it otherwise shares the cores with the loader workers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        files = stage(args.src, args.replicate, work / "images")
        images = str(work / "images")  # validation = training images: only the training loader is timed
        sources = PrepParams(train=images, val=images, shard_size=256)
        shards = PrepParams(train=images, val=images, shard_size=256, raw_pixels=args.raw_pixels,
                            reencode=args.reencode, restart_markers=args.restart_markers)
        prepare(shards, work / "shards", workers=args.workers)
        data = open_prepared(work / "shards")
        if not (args.no_ffcv or args.dali_only):
            from data_prep import ffcv_writer

            ffcv_writer.run(work / "ffcv", ffcv_writer.FFCVParams(), args.workers, sources=sources)
        needed = (args.batches + 1) * args.batch_size
        if needed > len(files):
            raise SystemExit(f"{len(files)} images are fewer than {needed} needed: raise --replicate")
        device = torch.device(args.device)
        on_gpu = device.type == "cuda"
        spec = PhotometricSpec()

        def reference_side(x: torch.Tensor) -> torch.Tensor:
            if args.loaders_only:
                return x
            x = x.to(device, non_blocking=True)
            if on_gpu:
                torch.cuda.synchronize()
            return x

        in_workers = args.photometric and not on_gpu
        stream = TrainStream(data.train, batch_size=args.batch_size, batches_per_epoch=len(files) // args.batch_size,
                             rank=0, world_size=1, seed=0, image_size=args.size, crop=CropSpec(), baked=False,
                             shuffle_buffer=1000, eval_resize=round(args.size * 256 / 224),
                             num_classes=data.num_classes,
                             photometric=spec if in_workers else None)
        contestants = {} if args.dali_only else {
            REFERENCE: (
                lambda: reference_loader(work / "images", args.size, args.batch_size, args.workers, args.photometric),
                reference_side),
            "WebDataset shards (this project)": (
                lambda: make_loader(stream, args.workers, pin_memory=on_gpu),
                (lambda x: x) if args.loaders_only else device_finish(device, args.photometric and on_gpu)),
        }
        results = dict.fromkeys(contestants, 0.0)
        for repeat in range(args.repeats):
            stream.set_epoch(repeat)
            for name, (make, side) in contestants.items():
                results[name] = max(results[name], timed(make(), args.batches, side))
        if not (args.no_ffcv or args.dali_only):
            job = (work / "ffcv" / "train.beton", args.size, args.batch_size, args.workers, args.batches,
                   args.repeats, args.photometric, args.device, args.loaders_only)
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                results[FFCV] = pool.apply(ffcv_rates, job)
        timing = (work / "shards", args.size, args.batch_size, args.workers, args.batches, args.repeats,
                  args.photometric, args.device)
        variants = []
        if not args.no_dali:  # the default (hardware decoder load 0, region decoding) first, then the others
            jobs = [(load, region) for region in (True, False) for load in (0.0, 1.0)][:4 if args.dali_variants else 1]
            variants = list(zip(jobs, in_own_process(dali_rates, *timing, args.loaders_only, jobs)))
            results[DALI] = variants[0][1][0]
        if not args.dali_variants:
            variants = []
        pixels = {}
        if args.pixels:
            pixels = in_own_process(pixel_differences, work / "shards", args.size, args.batch_size, 3)
        photometric = "off"
        if args.photometric:
            photometric = ("batched on the GPU" if on_gpu else
                           "per image in workers (FFCV, DALI: batched, main process)")
        stored = "raw pixels" if args.raw_pixels else "JPEG re-encoded at quality 90" if args.reencode else "JPEG"
        if args.restart_markers and not args.raw_pixels:
            stored += " with restart markers"
        print(f"{len(files)} images from {args.src} (x{args.replicate}), {args.size}px crops, batch {args.batch_size}, "
              f"{args.workers} workers, photometric {photometric}, "
              f"{'no device step' if args.loaders_only else f'device {device.type}'}; shards hold {stored}, "
              f"JPEG region decoder {'built' if jpeg_region.available() else 'not built (Pillow)'}")
        reference, ffcv_rate, dali_rate = results.get(REFERENCE), results.get(FFCV), results.get(DALI)
        for name, rate in results.items():
            versus = "".join(f"   {rate / other:.2f}x {what}" for other, what in
                             ((reference, "reference"), (ffcv_rate, "FFCV"), (dali_rate, "DALI")) if other)
            print(f"{name:34s} {rate:8.0f} img/s{versus}")
        for (load, region), (rate, memory) in variants:
            held = f", pipeline memory {memory:.2f} GiB" if memory is not None else ""
            print(f"DALI {'alone' if args.loaders_only else 'with the device step'}, hw decoder load {load:g}, "
                  f"{'region' if region else 'whole-image'} decoding: {rate:.0f} img/s{held}")
        if pixels:
            print("DALI's pixels against the shard loader's, same boxes (mean absolute difference, uint8 levels): "
                  + ", ".join(f"{name} {value:.2f}" for name, value in pixels.items()))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
