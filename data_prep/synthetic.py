"""Deterministic synthetic stand-in for ILSVRC2012 (the project's embedded demo dataset).

Layout written under OUT (same as the real ImageNet code path expects)::

    train/<wnid>/<wnid>_<n>.JPEG      val/ILSVRC2012_val_<8 digits>.JPEG
    val_labels.txt ("file wnid")      LOC_synset_mapping.txt ("wnid name")
    synthetic.json                    (written last: marks a complete output)

A class is a kind of object with its own shape, surface texture and colour (``CLASS_DESIGNS``),
as a real class has a typical look: colour and texture survive the paper's smallest crops, the
shape needs most of the object, and no cue decides alone (one object in ten comes in any colour;
backgrounds and clutter take any colour).
Hue, shade, background, clutter, position, scale, rotation, blur and noise are random per image,
drawn from an RNG keyed on (seed, split, class, index), so output is byte-identical for any
worker count.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

VERSION = 4  # bump whenever the images change: old outputs are then refused, not reused


@dataclass(frozen=True)
class Design:
    """A class as a kind of object: its shape, its surface's texture and its colour (a hue,
    varied per image), as the members of a real class share a typical look."""

    name: str  # the class name written to LOC_synset_mapping.txt
    shape: str
    texture: str  # plain, striped, dotted, checked, ringed (concentric), speckled
    hue: float  # degrees on the colour wheel


# Order matters: the first num_classes are used. The first ten differ in shape and in hue (at
# least 26 degrees apart); textures repeat, and the last four share hues with earlier ones.
CLASS_DESIGNS = (
    Design("red disc", "circle", "plain", 0),
    Design("orange striped square", "square", "striped", 32),
    Design("yellow dotted triangle", "triangle", "dotted", 58),
    Design("lime star", "star", "plain", 92),
    Design("green checked hexagon", "hexagon", "checked", 130),
    Design("cyan striped ring", "ring", "striped", 180),
    Design("azure ringed diamond", "diamond", "ringed", 207),
    Design("blue cross", "cross", "plain", 237),
    Design("violet dotted crescent", "crescent", "dotted", 275),
    Design("magenta striped arrow", "arrow", "striped", 315),
    Design("amber checked pentagon", "pentagon", "checked", 45),
    Design("jade ringed heart", "heart", "ringed", 155),
    Design("indigo speckled half-disc", "half-disc", "speckled", 255),
    Design("rose dotted trapezoid", "trapezoid", "dotted", 345),
)
DESIGNS = tuple(d.name for d in CLASS_DESIGNS)
_TRAIN, _VAL, _PERM = 0, 1, 2
_SS = 2  # supersampling factor for antialiased masks
_OBJECT_SCALE = (0.6, 1.0)  # object size / shorter side: the object fills much of the frame, as in ILSVRC
_HUE_JITTER = 5.0  # degrees (standard deviation) around the class's hue
_ODD_COLOUR = 0.1  # share of objects in any colour: shape and texture must tell those apart
_MIN_CONTRAST = 90  # RGB distance between the object's colour and the background's mean


@dataclass(frozen=True)
class SyntheticSpec:
    num_classes: int = 10          # 2..len(DESIGNS)
    train_per_class: int = 260
    val_per_class: int = 50
    min_side: int = 72             # image sides in [min_side, max_side]
    max_side: int = 160
    quality: int = 90
    seed: int = 0

    def validate(self) -> None:
        if not 2 <= self.num_classes <= len(DESIGNS):
            raise ValueError(f"num_classes must be in 2..{len(DESIGNS)}, got {self.num_classes}")
        if self.train_per_class < 1 or self.val_per_class < 1:
            raise ValueError("train_per_class and val_per_class must be >= 1")
        if not 16 <= self.min_side <= self.max_side:
            raise ValueError(f"need 16 <= min_side <= max_side, got {self.min_side}, {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")
        if self.seed < 0:
            raise ValueError("seed must be >= 0")


def wnid(class_index: int) -> str:
    return f"n{90000001 + class_index:08d}"


def classes(spec: SyntheticSpec) -> list[tuple[str, str]]:
    return [(wnid(i), DESIGNS[i]) for i in range(spec.num_classes)]


def val_labels(spec: SyntheticSpec) -> np.ndarray:
    """Class index of val image i+1: every class val_per_class times, seeded shuffle."""
    labels = np.repeat(np.arange(spec.num_classes), spec.val_per_class)
    return np.random.default_rng([spec.seed, _PERM]).permutation(labels)


# ----------------------------------------------------------------------------- rendering
def _lum(c) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    """One colour, hue in degrees, saturation and value in [0, 1] -> RGB in [0, 255]."""
    k = (np.array([5.0, 3.0, 1.0]) + hue / 60.0) % 6.0
    return 255.0 * value * (1 - saturation * np.clip(np.minimum(k, 4 - k), 0, 1))


def _object_colours(design: Design, rng) -> tuple[np.ndarray, np.ndarray | None]:
    """The object's colour (the class's hue, or any for an odd one) and its texture's: the same
    hue, darker or paler (None for a plain surface)."""
    if rng.random() < _ODD_COLOUR:
        hue = rng.uniform(0, 360)
    else:
        hue = design.hue + np.clip(rng.normal(0, _HUE_JITTER), -15, 15)
    saturation, value = rng.uniform(0.55, 1.0), rng.uniform(0.5, 1.0)
    colour = _hsv_to_rgb(hue, saturation, value)
    if design.texture == "plain":
        return colour, None
    if rng.random() < 0.5:
        return colour, _hsv_to_rgb(hue, saturation, value * rng.uniform(0.3, 0.55))
    return colour, _hsv_to_rgb(hue, saturation * rng.uniform(0.15, 0.45), max(value, 0.9))


def _polygon(c, r, n, phase=0.0, inner=None):
    pts = []
    for k in range(n * (2 if inner else 1)):
        rr = inner if inner and k % 2 else r
        a = phase + math.pi * k / (n if inner else n / 2)
        pts.append((c + rr * math.cos(a), c + rr * math.sin(a)))
    return pts


def _shape_mask(shape: str, D: int, r: float, rng) -> Image.Image:
    """'L' mask of one unrotated shape of radius ~r, centred on a D x D canvas."""
    c = D / 2
    m = Image.new("L", (D, D), 0)
    d = ImageDraw.Draw(m)
    box = lambda rr, dx=0.0, dy=0.0: (c + dx - rr, c + dy - rr, c + dx + rr, c + dy + rr)  # noqa: E731
    if shape == "circle":
        d.ellipse(box(r), fill=255)
    elif shape == "square":
        h = r * 0.85
        d.rectangle((c - h, c - h * rng.uniform(0.85, 1.0), c + h, c + h), fill=255)
    elif shape == "triangle":
        d.polygon(_polygon(c, r * 1.05, 3), fill=255)
    elif shape == "star":
        d.polygon(_polygon(c, r * 1.1, 5, inner=r * 1.1 * rng.uniform(0.38, 0.5)), fill=255)
    elif shape == "hexagon":
        d.polygon(_polygon(c, r, 6), fill=255)
    elif shape == "pentagon":
        d.polygon(_polygon(c, r, 5), fill=255)
    elif shape == "diamond":
        w = r * rng.uniform(0.6, 0.8)
        d.polygon([(c, c - r), (c + w, c), (c, c + r), (c - w, c)], fill=255)
    elif shape == "ring":
        d.ellipse(box(r), fill=255)
        d.ellipse(box(r * rng.uniform(0.45, 0.6)), fill=0)
    elif shape == "cross":
        t, a = r * rng.uniform(0.25, 0.35), r * 0.95
        d.rectangle((c - a, c - t, c + a, c + t), fill=255)
        d.rectangle((c - t, c - a, c + t, c + a), fill=255)
    elif shape == "crescent":
        d.ellipse(box(r), fill=255)
        d.ellipse(box(r * rng.uniform(0.8, 0.9), r * rng.uniform(0.4, 0.55)), fill=0)
    elif shape == "arrow":
        t, hx = r * rng.uniform(0.2, 0.28), c + r * 0.1
        d.rectangle((c - r, c - t, hx, c + t), fill=255)
        d.polygon([(hx - r * 0.1, c - r * 0.7), (c + r, c), (hx - r * 0.1, c + r * 0.7)], fill=255)
    elif shape == "heart":
        d.ellipse(box(r * 0.5, -r * 0.48, -r * 0.3), fill=255)
        d.ellipse(box(r * 0.5, r * 0.48, -r * 0.3), fill=255)
        d.polygon([(c - r * 0.96, c - r * 0.15), (c + r * 0.96, c - r * 0.15), (c, c + r)], fill=255)
    elif shape == "half-disc":
        d.pieslice(box(r, 0, r * 0.4), 180, 360, fill=255)
    elif shape == "trapezoid":
        top = r * rng.uniform(0.35, 0.55)
        d.polygon([(c - top, c - r * 0.7), (c + top, c - r * 0.7), (c + r, c + r * 0.7), (c - r, c + r * 0.7)],
                  fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m


def _texture_mask(texture: str, D: int, r: float, rng) -> np.ndarray:
    """Where the texture's second colour lies (unrotated frame), a few repeats across the object."""
    v, u = np.mgrid[0:D, 0:D].astype(np.float32) - D / 2 + 0.5
    if texture == "striped":
        period = 2 * r / rng.uniform(3.0, 4.5)
        return (v / period + rng.random()) % 1.0 < rng.uniform(0.4, 0.6)
    if texture == "checked":
        cell = 2 * r / rng.uniform(3.0, 4.5)
        return (np.floor(u / cell + rng.random()) + np.floor(v / cell + rng.random())) % 2 == 0
    if texture == "dotted":
        spacing = 2 * r / rng.uniform(2.8, 4.0)
        row = np.floor(v / spacing)
        du = (u / spacing + 0.5 * (row % 2) + rng.random()) % 1.0 - 0.5
        dv = (v / spacing) % 1.0 - 0.5
        return du * du + dv * dv <= rng.uniform(0.25, 0.35) ** 2
    if texture == "ringed":
        spacing = r / rng.uniform(2.0, 3.0)
        return (np.hypot(u, v) / spacing + rng.random()) % 1.0 < 0.5
    if texture == "speckled":
        cells = rng.random((8, 8)) < 0.4
        grain = int(math.ceil(D / 8))
        return np.kron(cells, np.ones((grain, grain), bool))[:D, :D]
    raise ValueError(f"unknown texture {texture!r}")


def _render_object(design: Design, S: float, rng) -> tuple[Image.Image, np.ndarray]:
    """The object, size ~S px, as an RGBA image (alpha: its antialiased shape) rotated at random,
    and its main colour."""
    D = int(math.ceil(S * 1.5)) * _SS
    r = S * _SS / 2
    colour, second = _object_colours(design, rng)
    mask = _shape_mask(design.shape, D, r, rng)
    pixels = np.broadcast_to(colour, (D, D, 3)).copy()
    if second is not None:
        pixels[_texture_mask(design.texture, D, r, rng)] = second
    rgba = np.dstack([np.clip(pixels + 0.5, 0, 255).astype(np.uint8), np.asarray(mask)])
    obj = Image.fromarray(rgba, "RGBA").rotate(float(rng.uniform(0, 360)), resample=Image.BILINEAR)
    return obj.reduce(_SS), colour


def _clutter(img: Image.Image, rng, count: int, scale: tuple[float, float]) -> None:
    """Unrelated things in any colour (blobs, boxes, bars, lines) drawn onto ``img``."""
    w, h = img.size
    d = ImageDraw.Draw(img)
    for _ in range(count):
        size = rng.uniform(*scale) * min(w, h)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = rng.integers(0, 4)
        if kind == 0:
            top, bottom = size * rng.uniform(0.2, 0.5), size * rng.uniform(0.2, 0.5)
            d.ellipse((cx - size / 2, cy - top, cx + size / 2, cy + bottom), fill=fill)
        elif kind == 1:
            d.rectangle((cx - size / 2, cy - size / 3, cx + size / 2, cy + size / 3), fill=fill)
        elif kind == 2:
            angles = np.sort(rng.uniform(0, 2 * math.pi, int(rng.integers(3, 7))))
            radii = size / 2 * rng.uniform(0.5, 1.0, len(angles))
            d.polygon([(cx + q * math.cos(a), cy + q * math.sin(a)) for a, q in zip(angles, radii)], fill=fill)
        else:
            a = rng.uniform(0, math.pi)
            dx, dy = size * math.cos(a), size * math.sin(a)
            d.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=fill, width=int(rng.integers(1, 4)))


def _size(rng, spec) -> tuple[int, int]:
    aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.7)))  # width / height
    lo, hi = spec.min_side, spec.max_side
    short = rng.uniform(lo, max(lo, hi / max(aspect, 1 / aspect)))
    w, h = (short * aspect, short) if aspect >= 1 else (short, short / aspect)
    return int(np.clip(round(w), lo, hi)), int(np.clip(round(h), lo, hi))


def _background(w: int, h: int, avoid: np.ndarray, rng) -> Image.Image:
    """A random colour, a linear gradient and low-frequency blotches, its mean far enough from
    ``avoid`` (the object's colour) that the object stands out."""
    for _ in range(32):
        base = rng.uniform(0, 255, 3)
        other = np.clip(base + rng.normal(0, 45, 3), 0, 255)
        mean = (base + other) / 2
        if np.linalg.norm(mean - avoid) >= _MIN_CONTRAST and abs(_lum(mean) - _lum(avoid)) >= 30:
            break
    else:  # the object's opposite in lightness
        base = other = np.full(3, 20.0 if _lum(avoid) > 127 else 235.0)
    th = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xx * math.cos(th) + yy * math.sin(th)
    t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
    bg = base + (other - base) * t[..., None]
    if rng.random() < 0.5:
        small = rng.normal(0, rng.uniform(5, 20), (3, 4, 3)).astype(np.float32)
        bg += np.stack([np.asarray(Image.fromarray(small[..., i], "F").resize((w, h), Image.BICUBIC))
                        for i in range(3)], axis=-1)
    return Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")


def render(spec: SyntheticSpec, split: int, class_index: int, index: int) -> Image.Image:
    """One RGB image of class ``CLASS_DESIGNS[class_index]``; split is 0 (train) or 1 (val)."""
    rng = np.random.default_rng([spec.seed, split, class_index, index])
    w, h = _size(rng, spec)
    S = rng.uniform(*_OBJECT_SCALE) * min(w, h)
    obj, colour = _render_object(CLASS_DESIGNS[class_index], S, rng)
    img = _background(w, h, colour, rng)
    _clutter(img, rng, int(rng.integers(1, 5)), (0.1, 0.35))  # behind the object
    if rng.random() < 0.05:  # may be cut by the border
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    else:
        cx, cy = rng.uniform(S / 2, w - S / 2), rng.uniform(S / 2, h - S / 2)
    img.paste(obj, (int(round(cx - obj.width / 2)), int(round(cy - obj.height / 2))), obj)
    if rng.random() < 0.25:  # something small in front of it
        _clutter(img, rng, 1, (0.08, 0.2))
    # mild blur and sensor noise
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    noise = rng.normal(0, rng.uniform(1.0, 7.0), (h, w, 3)).astype(np.float32)
    arr = np.asarray(img, dtype=np.float32) + noise
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")


def _render_chunk(args) -> int:
    spec, jobs = args
    for split, cls, idx, path in jobs:
        render(spec, split, cls, idx).save(path, "JPEG", quality=spec.quality)
    return len(jobs)


# ----------------------------------------------------------------------------- output
def _meta(spec: SyntheticSpec) -> dict:
    return {"generator": "data_prep.synthetic", "version": VERSION, "spec": asdict(spec),
            "counts": {"train": spec.num_classes * spec.train_per_class,
                       "val": spec.num_classes * spec.val_per_class},
            "classes": [list(c) for c in classes(spec)]}


def _summary(out: Path, meta: dict, generated: bool) -> dict:
    return {"out": str(out), "spec": meta["spec"], "counts": dict(meta["counts"]),
            "classes": [tuple(c) for c in meta["classes"]], "generated": generated}


def written_version(out: Path) -> int | None:
    """The generator version that wrote the complete output in ``out`` (None: none there)."""
    try:
        meta = json.loads((Path(out) / "synthetic.json").read_text())
    except (OSError, ValueError):
        return None
    return meta.get("version") if isinstance(meta, dict) else None


def generate(out: Path, spec: SyntheticSpec = SyntheticSpec(), workers: int = 1) -> dict:
    """Write the synthetic ILSVRC-style dataset under `out`; no-op if already complete."""
    spec.validate()
    out = Path(out)
    meta = _meta(spec)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        try:
            existing = json.loads((out / "synthetic.json").read_text())
        except (OSError, ValueError):
            existing = None
        if existing == meta:
            return _summary(out, meta, generated=False)
        raise ValueError(f"refusing to write into non-empty directory {out}: it is not a complete "
                         f"synthetic output of this spec (remove it or choose another path)")
    cls_list = classes(spec)
    jobs = []
    for c, (w, _) in enumerate(cls_list):
        (out / "train" / w).mkdir(parents=True, exist_ok=True)
        jobs += [(_TRAIN, c, n, str(out / "train" / w / f"{w}_{n}.JPEG"))
                 for n in range(1, spec.train_per_class + 1)]
    (out / "val").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, c in enumerate(val_labels(spec), start=1):
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        jobs.append((_VAL, int(c), i, str(out / "val" / name)))
        lines.append(f"{name} {cls_list[c][0]}\n")
    chunk = 64
    tasks = [(spec, jobs[i:i + chunk]) for i in range(0, len(jobs), chunk)]
    if workers <= 1:
        for task in tasks:
            _render_chunk(task)
    else:
        # spawn: safe even when the caller has torch/OpenMP threads running
        with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            for _ in pool.imap_unordered(_render_chunk, tasks):
                pass
    (out / "val_labels.txt").write_text("".join(lines))
    (out / "LOC_synset_mapping.txt").write_text("".join(f"{w} {n}\n" for w, n in cls_list))
    tmp = out / "synthetic.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, out / "synthetic.json")
    return _summary(out, meta, generated=True)


# ----------------------------------------------------------------------------- CLI
def _cli(args) -> int:
    spec = SyntheticSpec(num_classes=args.num_classes, train_per_class=args.train_per_class,
                         val_per_class=args.val_per_class, seed=args.seed)
    t0 = time.perf_counter()
    s = generate(args.out, spec, workers=args.workers)
    what = "generated" if s["generated"] else "already complete:"
    print(f"synthetic: {what} {s['counts']['train']} train + {s['counts']['val']} val images, "
          f"{len(s['classes'])} classes in {s['out']} ({time.perf_counter() - t0:.1f}s)")
    return 0


def add_cli(subparsers) -> None:
    d = SyntheticSpec()
    p = subparsers.add_parser("synthetic", help="generate the synthetic ILSVRC-style demo dataset")
    p.add_argument("out", type=Path, help="output directory (must be empty or a previous output)")
    p.add_argument("--num-classes", type=int, default=d.num_classes)
    p.add_argument("--train-per-class", type=int, default=d.train_per_class)
    p.add_argument("--val-per-class", type=int, default=d.val_per_class)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=1, help="processes (output is identical)")
    p.set_defaults(func=_cli)
