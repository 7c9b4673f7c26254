"""The loader's resampling in C (``imaging/resample.c``): Pillow's filters and arithmetic.

Checked bit for bit against a plain numpy transcription of Pillow's algorithm (weights in
double, 22-bit fixed point, horizontal pass then vertical), and against Pillow itself: exactly
where Pillow 13 also goes horizontal first (square images), and to one level everywhere for the
filters without overshoot."""
from __future__ import annotations

import math
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imaging import jpeg_region

PILLOW = {"area": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
SUPPORT = {"area": 0.5, "bilinear": 1.0, "bicubic": 2.0}
BITS = 22


def weight(interpolation: str, x: float) -> float:
    if interpolation == "area":
        return 1.0 if -0.5 < x <= 0.5 else 0.0
    x = abs(x)
    if interpolation == "bilinear":
        return 1.0 - x if x < 1.0 else 0.0
    a = -0.5
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    return (((x - 5) * x + 8) * x - 4) * a if x < 2.0 else 0.0


def coefficients(in_size: int, in0: float, in1: float, out_size: int, interpolation: str):
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc: (first, weights) per output pixel."""
    in0, in1 = np.float32(in0), np.float32(in1)
    scale = float(np.float32(in1 - in0)) / out_size
    filterscale = max(scale, 1.0)
    support = SUPPORT[interpolation] * filterscale
    out = []
    for i in range(out_size):
        center = float(in0) + (i + 0.5) * scale
        first = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), in_size) - first
        w = [weight(interpolation, (x + first - center + 0.5) / filterscale) for x in range(count)]
        total = sum(w)
        w = [v / total if total != 0.0 else v for v in w]
        out.append((first, [int(-0.5 + v * (1 << BITS)) if v < 0 else int(0.5 + v * (1 << BITS)) for v in w]))
    return out


def one_pass(pixels: np.ndarray, coeffs) -> np.ndarray:
    """Resample axis 1 of [rows, columns, 3] int64 pixels."""
    out = np.empty((pixels.shape[0], len(coeffs), 3), np.int64)
    for i, (first, w) in enumerate(coeffs):
        total = np.full((pixels.shape[0], 3), 1 << (BITS - 1), np.int64)
        for t, k in enumerate(w):
            total += pixels[:, first + t] * k
        out[:, i] = np.clip(total >> BITS, 0, 255)
    return out


def reference(pixels: np.ndarray, box, size: int, interpolation: str) -> np.ndarray:
    height, width = pixels.shape[:2]
    need_horizontal = size != width or box[0] != 0 or box[2] != size
    need_vertical = size != height or box[1] != 0 or box[3] != size
    vertical = coefficients(height, box[1], box[3], size, interpolation)
    out = pixels.astype(np.int64)
    if need_horizontal:
        first, last = vertical[0][0], vertical[-1][0] + len(vertical[-1][1])
        out = one_pass(out[first:last], coefficients(width, box[0], box[2], size, interpolation))
        vertical = [(f - first, w) for f, w in vertical]
    if need_vertical:
        out = one_pass(out.transpose(1, 0, 2), vertical).transpose(1, 0, 2)
    return out.astype(np.uint8)


def random_case(rng: random.Random, square: bool = False):
    width = rng.randint(1, 70)
    height = width if square else rng.randint(1, 70)
    pixels = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 256, (height, width, 3), dtype=np.uint8)
    x0, y0 = rng.uniform(0, width - 0.5), rng.uniform(0, height - 0.5)
    box = (x0, y0, rng.uniform(x0 + 0.25, width), rng.uniform(y0 + 0.25, height))
    if rng.random() < 0.2:  # whole-pixel boxes, also the whole image
        box = tuple(float(v) for v in (math.floor(box[0]), math.floor(box[1]), width, height))
    return pixels, box, rng.randint(1, 60), rng.choice(sorted(PILLOW))


def test_resample_is_pillows_algorithm_bit_for_bit(region_decoder):
    rng = random.Random(0)
    for _ in range(150):
        pixels, box, size, interpolation = random_case(rng)
        got = jpeg_region.resample(pixels, box, size, interpolation)
        np.testing.assert_array_equal(got, reference(pixels, box, size, interpolation),
                                      err_msg=f"{pixels.shape} {box} -> {size} {interpolation}")


def test_resample_equals_pillow(region_decoder):
    rng = random.Random(1)
    for case in range(300):
        pixels, box, size, interpolation = random_case(rng, square=case % 2 == 0)
        got = jpeg_region.resample(pixels, box, size, interpolation).astype(np.int16)
        pillow = np.asarray(Image.fromarray(pixels).resize((size, size), PILLOW[interpolation], box=box), np.int16)
        what = f"{pixels.shape} {box} -> {size} {interpolation}"
        if pixels.shape[0] == pixels.shape[1]:  # Pillow goes horizontal first too: the same bytes
            np.testing.assert_array_equal(got, pillow, err_msg=what)
        elif interpolation != "bicubic":  # the other order rounds its intermediate differently
            assert np.abs(got - pillow).max() <= 1, what


def test_mirror_is_the_flipped_crop_and_strided_rows_are_read_in_place(region_decoder):
    data = np.random.default_rng(2).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    view = data[5:35, 10:50]  # rows 192 bytes apart, 120 used
    for interpolation in PILLOW:
        for box, size in [((0.5, 1.25, 39.0, 28.0), 24), ((0, 0, 40, 30), 40), ((0, 0, 40, 30), 17)]:
            plain = jpeg_region.resample(view, box, size, interpolation)
            mirrored = jpeg_region.resample(view, box, size, interpolation, mirror=True)
            np.testing.assert_array_equal(mirrored, plain[:, ::-1])
            np.testing.assert_array_equal(plain, reference(np.ascontiguousarray(view), box, size, interpolation))


def test_resample_refuses_what_it_cannot_read(region_decoder):
    pixels = np.zeros((10, 12, 3), np.uint8)
    with pytest.raises(ValueError, match="outside|not inside"):
        jpeg_region.resample(pixels, (0, 0, 13, 10), 8, "bilinear")
    with pytest.raises(ValueError, match="packed RGB uint8"):
        jpeg_region.resample(pixels[:, ::2], (0, 0, 6, 10), 8, "bilinear")
    with pytest.raises(ValueError, match="packed RGB uint8"):
        jpeg_region.resample(pixels.astype(np.float32), (0, 0, 12, 10), 8, "bilinear")
    with pytest.raises(ValueError, match="not inside"):
        jpeg_region.resample(pixels, (0, float("nan"), 12, 10), 8, "bicubic")


def test_the_resampling_benchmark_prints_pillows_and_torchs_ratios_per_filter(region_decoder, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import bench_resample

    bench_resample.main(["--images", "8", "--size", "32", "--repeats", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "8 images, 5 training crops each, 32px"
    rows = {line.split()[0]: [float(r) for r in re.findall(r"([0-9.]+)x", line)] for line in lines[2:]}
    assert set(rows) == set(PILLOW) and all(len(r) == 2 and min(r) > 0 for r in rows.values())
    # C's pixels are Pillow's (landscape images: Pillow 13 goes horizontal first too); torch's are not
    assert all(" C   0 / 0.000, torch " in line for line in lines[2:])
