"""The loader's resampling in C (``imaging/resample.c``) against Pillow's, on the same decoded
images and the same training crops, in one run.

    python benchmarks/bench_resample.py [--src DIR] [--size 224] [--repeats 5]

For each image of ``--src`` (default: 40 synthetic 500x375 photos), 5 crops drawn as the
trainer draws them (area 8-100%, aspect 3/4-4/3, half of them mirrored) are resized to
``--size`` with each filter: by Pillow (``Image.fromarray(pixels).resize(..., box=...)``, then
the mirror and the array the loader ships) and by ``jpeg_region.resample`` (mirror in the
weights). Prints ms per crop, best of ``--repeats`` passes, and Pillow's time over C's.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from imaging import jpeg_region  # noqa: E402
from imaging.crops import sample_crop  # noqa: E402
from imaging.specs import CropSpec  # noqa: E402

PILLOW = {"area": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def load_images(src: Path | None) -> list[np.ndarray]:
    if src is None:
        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:375, 0:500].astype(np.float32)
        return [np.clip(np.stack([x / 2.5, y / 1.9, (x + y) / 3.4], 2) + rng.normal(0, 20, (375, 500, 3)), 0, 255)
                .astype(np.uint8) for _ in range(40)]
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    if not files:
        raise SystemExit(f"no .jpg, .jpeg or .png files under {src}")
    return [np.asarray(Image.open(p).convert("RGB")) for p in files]


def pillow_crop(pixels: np.ndarray, box, size: int, interpolation: str, mirror: bool) -> np.ndarray:
    out = np.asarray(Image.fromarray(pixels).resize((size, size), PILLOW[interpolation], box=box))
    return np.ascontiguousarray(out[:, ::-1]) if mirror else out


def best_time(crops, resize, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for pixels, box, size, interpolation, mirror in crops:
            resize(pixels, box, size, interpolation, mirror)
        best = min(best, time.perf_counter() - start)
    return best / len(crops) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, help="a folder of images (default: synthetic photos)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if not jpeg_region.available():
        raise SystemExit("the C library is not built: python -m imaging.jpeg_region build")
    images = load_images(args.src)
    rng = random.Random(0)
    spec = CropSpec()
    print(f"{len(images)} images, 5 training crops each, {args.size}px")
    for interpolation in PILLOW:
        crops = []
        for pixels in images:
            for _ in range(5):
                p = sample_crop(pixels.shape[1], pixels.shape[0], spec, rng)
                crops.append((pixels, (p.left, p.top, p.left + p.width, p.top + p.height), args.size,
                              interpolation, p.flip))
        pillow = best_time(crops, pillow_crop, args.repeats)
        c = best_time(crops, jpeg_region.resample, args.repeats)
        print(f"{interpolation:9s} Pillow {pillow:6.3f} ms   C {c:6.3f} ms   {pillow / c:5.2f}x Pillow")


if __name__ == "__main__":
    main()
