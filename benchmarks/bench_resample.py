"""The loader's resampling in C (``imaging/resample.c``) against Pillow's and torch's, on the
same decoded images and the same training crops, in one run.

    python benchmarks/bench_resample.py [--src DIR] [--images N] [--size 224] [--repeats 5]

For each image of ``--src`` (default: 40 synthetic 500x375 photos; ``--images N``: the first
N), 5 crops drawn as the trainer draws them (area 8-100%, aspect 3/4-4/3, half of them
mirrored) are resized to ``--size`` with each filter, single-threaded as in a loader worker:

- by Pillow (``Image.fromarray(pixels).resize(..., box=...)``, then the mirror and the array
  the loader ships);
- by ``jpeg_region.resample`` (mirror in the weights);
- by torch (``interpolate(crop, size, mode, antialias=True)`` on the uint8 crop copied into a
  channels_last NCHW tensor, then ``flip``). torch has no antialiased uint8 box filter
  (``antialias`` is for bilinear and bicubic; ``mode="area"`` is adaptive average pooling, not
  implemented for uint8): its ``area`` column is ``mode="area"`` in float32, rounded back.

Prints ms per crop (best of ``--repeats`` passes), Pillow's and torch's time over C's, and how
far C's and torch's pixels are from Pillow's (max / mean absolute difference in levels).

Measured 2026-12-03 on a 2-core AMD EPYC VM, no GPU (torch 2.14.1), two runs each on the 100
ILSVRC samples at 224 px (``--src /tmp/imagenet-samples-100``) and on 500 CIFAR-10 JPEGs at
32 px (``--src /tmp/cifar10/test --images 500 --size 32``), torch's time over C's:

- bilinear 0.59x / 0.61x at 224 px, 2.53x / 3.27x at 32 px;
- bicubic 0.66x / 0.48x at 224 px, 2.15x / 2.34x at 32 px;
- area (float32 pooling) 7.8-11x, and up to 191 levels off Pillow's BOX (mean 5.6 at 224 px).

torch is not within 10% of C for every filter the loader uses: it has no box filter, and its
per-call overhead dominates small crops. It is also not Pillow's at the crop's edges (up to 70
levels; it sees only the crop, Pillow's filters read around it) and cannot take the fractional
boxes of a reduced-scale decode. The C resampler stays (docs/performance.md#resampling).
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from imaging import jpeg_region  # noqa: E402
from imaging.crops import sample_crop  # noqa: E402
from imaging.specs import CropSpec  # noqa: E402

PILLOW = {"area": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def load_images(src: Path | None, count: int | None = None) -> list[np.ndarray]:
    if src is None:
        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:375, 0:500].astype(np.float32)
        return [np.clip(np.stack([x / 2.5, y / 1.9, (x + y) / 3.4], 2) + rng.normal(0, 20, (375, 500, 3)), 0, 255)
                .astype(np.uint8) for _ in range(count or 40)]
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))[:count]
    if not files:
        raise SystemExit(f"no .jpg, .jpeg or .png files under {src}")
    return [np.array(Image.open(p).convert("RGB")) for p in files]  # writable, as torch.from_numpy wants


def pillow_crop(pixels: np.ndarray, box, size: int, interpolation: str, mirror: bool) -> np.ndarray:
    out = np.asarray(Image.fromarray(pixels).resize((size, size), PILLOW[interpolation], box=box))
    return np.ascontiguousarray(out[:, ::-1]) if mirror else out


def torch_crop(pixels: np.ndarray, box, size: int, interpolation: str, mirror: bool) -> np.ndarray:
    """The crop's pixels (whole-pixel box) as a [1, 3, h, w] channels_last tensor, resized by
    torch; the same [size, size, 3] array the loader ships. The copy into a packed tensor is
    torch's fast case: on the strided view of the image its output comes out NCHW, and the
    transposing copy back to rows of RGB doubles its time."""
    left, top, right, bottom = box
    crop = torch.from_numpy(pixels[top:bottom, left:right]).permute(2, 0, 1).unsqueeze(0)
    crop = crop.contiguous(memory_format=torch.channels_last)
    if interpolation == "area":  # no uint8 kernel: float32 adaptive average pooling
        out = torch.nn.functional.interpolate(crop.float(), size=(size, size), mode="area")
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    else:
        out = torch.nn.functional.interpolate(crop, size=(size, size), mode=interpolation, antialias=True)
    if mirror:
        out = out.flip(3)
    return np.ascontiguousarray(out[0].permute(1, 2, 0).numpy())


def best_time(crops, resize, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for pixels, box, size, interpolation, mirror in crops:
            resize(pixels, box, size, interpolation, mirror)
        best = min(best, time.perf_counter() - start)
    return best / len(crops) * 1e3


def difference(crops, resize) -> tuple[int, float]:
    """Max and mean absolute difference from Pillow's pixels, in levels of 255, over all crops."""
    worst, total, count = 0, 0.0, 0
    for crop in crops:
        diff = np.abs(resize(*crop).astype(np.int16) - pillow_crop(*crop).astype(np.int16))
        worst, total, count = max(worst, int(diff.max())), total + float(diff.sum()), count + diff.size
    return worst, total / count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, help="a folder of images (default: synthetic photos)")
    parser.add_argument("--images", type=int, help="only the first N images")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if not jpeg_region.available():
        raise SystemExit(f"the C library is not in use: {jpeg_region.native_status()}")
    torch.set_num_threads(1)  # as in a loader worker
    images = load_images(args.src, args.images)
    rng = random.Random(0)
    spec = CropSpec()
    print(f"{len(images)} images, 5 training crops each, {args.size}px")
    print("filter    ms per crop: Pillow / C / torch    Pillow/C  torch/C    "
          "max / mean abs diff from Pillow: C, torch")
    for interpolation in PILLOW:
        crops = []
        for pixels in images:
            for _ in range(5):
                p = sample_crop(pixels.shape[1], pixels.shape[0], spec, rng)
                crops.append((pixels, (p.left, p.top, p.left + p.width, p.top + p.height), args.size,
                              interpolation, p.flip))
        pillow = best_time(crops, pillow_crop, args.repeats)
        c = best_time(crops, jpeg_region.resample, args.repeats)
        torch_ms = best_time(crops, torch_crop, args.repeats)
        c_max, c_mean = difference(crops, jpeg_region.resample)
        torch_max, torch_mean = difference(crops, torch_crop)
        print(f"{interpolation:9s} {pillow:6.3f} / {c:6.3f} / {torch_ms:6.3f}           {pillow / c:5.2f}x   "
              f"{torch_ms / c:5.2f}x    C {c_max:3d} / {c_mean:.3f}, torch {torch_max:3d} / {torch_mean:.3f}")


if __name__ == "__main__":
    main()
