"""Deterministic synthetic stand-in for ILSVRC2012 (the project's embedded demo dataset).

Layout written under OUT (same as the real ImageNet code path expects)::

    train/<wnid>/<wnid>_<n>.JPEG      val/ILSVRC2012_val_<8 digits>.JPEG
    val_labels.txt ("file wnid")      LOC_synset_mapping.txt ("wnid name")
    synthetic.json                    (written last: marks a complete output)

Classes differ only by shape / texture.  Colours, background, position, scale,
rotation, blur and noise are random per image, drawn from an RNG keyed on
(seed, split, class, index), so output is byte-identical for any worker count.
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

VERSION = 3  # bump whenever the images change: old outputs are then refused, not reused
# Order matters: the first num_classes designs are used (most distinct first).
DESIGNS = ("circle", "square", "triangle", "star", "cross", "ring", "stripes",
           "checkerboard", "polka dots", "diagonal lines", "hexagon",
           "concentric squares", "crescent", "arrow")
TEXTURES = {"stripes", "checkerboard", "polka dots", "diagonal lines"}
_TRAIN, _VAL, _PERM = 0, 1, 2
_SS = 2  # supersampling factor for antialiased masks
_OBJECT_SCALE = (0.55, 0.9)  # object size / shorter side: large enough for a GoogLeNet to learn in minutes
_MIN_CONTRAST = 45  # luminance difference object vs. mean background


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


def _contrasting_colour(rng, bg) -> tuple[int, int, int]:
    for _ in range(64):
        c = rng.integers(0, 256, 3)
        if abs(_lum(c) - _lum(bg)) >= _MIN_CONTRAST and np.linalg.norm(c - bg) >= 90:
            return tuple(int(v) for v in c)
    return (0, 0, 0) if _lum(bg) > 127 else (255, 255, 255)


def _polygon(c, r, n, phase=0.0, inner=None):
    pts = []
    for k in range(n * (2 if inner else 1)):
        rr = inner if inner and k % 2 else r
        a = phase + math.pi * k / (n if inner else n / 2)
        pts.append((c + rr * math.cos(a), c + rr * math.sin(a)))
    return pts


def _texture(name, D, r, rng) -> np.ndarray:
    """Boolean texture patch (unrotated frame) on a D x D supersampled canvas."""
    v, u = np.mgrid[0:D, 0:D].astype(np.float32) - D / 2 + 0.5
    if rng.random() < 0.5:
        h = r * rng.uniform(0.75, 0.9)
        patch = (np.abs(u) <= h) & (np.abs(v) <= h * rng.uniform(0.8, 1.0))
    else:
        patch = u * u + (v * rng.uniform(1.0, 1.2)) ** 2 <= r * r
    if name in ("stripes", "diagonal lines"):
        p = 2 * r / rng.uniform(2.5, 4.5)
        tex = (v / p + rng.random()) % 1.0 < rng.uniform(0.4, 0.6)
    elif name == "checkerboard":
        cell = 2 * r / rng.uniform(3.0, 5.0)
        tex = (np.floor(u / cell + rng.random()) + np.floor(v / cell + rng.random())) % 2 == 0
    else:  # polka dots
        sp = 2 * r / rng.uniform(2.5, 4.0)
        row = np.floor(v / sp)
        du = (u / sp + 0.5 * (row % 2) + rng.random()) % 1.0 - 0.5
        dv = (v / sp) % 1.0 - 0.5
        tex = du * du + dv * dv <= rng.uniform(0.22, 0.35) ** 2
    return patch & tex


def _object_mask(name, S, rng) -> Image.Image:
    """Antialiased, rotated 'L' mask of one object of size ~S px on a square canvas."""
    D = int(math.ceil(S * 1.5)) * _SS
    r, c = S * _SS / 2, D / 2
    if name in TEXTURES:
        m = Image.fromarray(_texture(name, D, r, rng).astype(np.uint8) * 255)
    else:
        m = Image.new("L", (D, D), 0)
        d = ImageDraw.Draw(m)
        box = lambda rr, dx=0.0: (c + dx - rr, c - rr, c + dx + rr, c + rr)  # noqa: E731
        if name == "circle":
            d.ellipse(box(r), fill=255)
        elif name == "square":
            h = r * 0.85
            d.rectangle((c - h, c - h * rng.uniform(0.85, 1.0), c + h, c + h), fill=255)
        elif name == "triangle":
            d.polygon(_polygon(c, r * 1.05, 3), fill=255)
        elif name == "star":
            d.polygon(_polygon(c, r * 1.1, 5, inner=r * 1.1 * rng.uniform(0.38, 0.5)), fill=255)
        elif name == "cross":
            t, a = r * rng.uniform(0.22, 0.32), r * 0.95
            d.rectangle((c - a, c - t, c + a, c + t), fill=255)
            d.rectangle((c - t, c - a, c + t, c + a), fill=255)
        elif name == "ring":
            d.ellipse(box(r), fill=255)
            d.ellipse(box(r * rng.uniform(0.45, 0.65)), fill=0)
        elif name == "hexagon":
            d.polygon(_polygon(c, r, 6), fill=255)
        elif name == "concentric squares":
            k = int(rng.integers(3, 5))
            for i in range(2 * k):
                h = r * 0.85 * (1 - i / (2 * k))
                d.rectangle((c - h, c - h, c + h, c + h), fill=255 if i % 2 == 0 else 0)
        elif name == "crescent":
            d.ellipse(box(r), fill=255)
            d.ellipse(box(r * rng.uniform(0.8, 0.95), r * rng.uniform(0.35, 0.6)), fill=0)
        elif name == "arrow":
            t, hx = r * rng.uniform(0.15, 0.22), c + r * 0.1
            d.rectangle((c - r, c - t, hx, c + t), fill=255)
            d.polygon([(hx - r * 0.1, c - r * 0.65), (c + r, c), (hx - r * 0.1, c + r * 0.65)], fill=255)
        else:
            raise ValueError(f"unknown design {name!r}")
    if name == "stripes":
        angle = rng.uniform(-15, 15)
    elif name == "diagonal lines":
        angle = rng.choice([-45.0, 45.0]) + rng.uniform(-12, 12)
    else:
        angle = rng.uniform(0, 360)
    return m.rotate(float(angle), resample=Image.BILINEAR).reduce(_SS)


def _size(rng, spec) -> tuple[int, int]:
    aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.7)))  # width / height
    lo, hi = spec.min_side, spec.max_side
    short = rng.uniform(lo, max(lo, hi / max(aspect, 1 / aspect)))
    w, h = (short * aspect, short) if aspect >= 1 else (short, short / aspect)
    return int(np.clip(round(w), lo, hi)), int(np.clip(round(h), lo, hi))


def render(spec: SyntheticSpec, split: int, class_index: int, index: int) -> Image.Image:
    """One RGB image of design DESIGNS[class_index]; split is 0 (train) or 1 (val)."""
    rng = np.random.default_rng([spec.seed, split, class_index, index])
    w, h = _size(rng, spec)
    # background: random colour, linear gradient, low-frequency blotches
    base = rng.uniform(0, 255, 3)
    other = np.clip(base + rng.normal(0, 45, 3), 0, 255)
    th = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xx * math.cos(th) + yy * math.sin(th)
    t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
    bg = base + (other - base) * t[..., None]
    if rng.random() < 0.5:
        small = rng.normal(0, rng.uniform(5, 20), (3, 4, 3)).astype(np.float32)
        bg += np.stack([np.asarray(Image.fromarray(small[..., i], "F").resize((w, h), Image.BICUBIC))
                        for i in range(3)], axis=-1)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.25:  # faint distractor lines
        over = img.copy()
        d = ImageDraw.Draw(over)
        for _ in range(int(rng.integers(1, 4))):
            d.line([tuple(rng.uniform(0, (w, h))), tuple(rng.uniform(0, (w, h)))],
                   fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 4)))
        img = Image.blend(img, over, float(rng.uniform(0.15, 0.3)))
    # the object
    colour = _contrasting_colour(rng, (base + other) / 2)
    S = rng.uniform(*_OBJECT_SCALE) * min(w, h)
    mask = _object_mask(DESIGNS[class_index], S, rng)
    if rng.random() < 0.05:  # may be cut by the border
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    else:
        cx, cy = rng.uniform(S / 2, w - S / 2), rng.uniform(S / 2, h - S / 2)
    x0, y0 = int(round(cx - mask.width / 2)), int(round(cy - mask.height / 2))
    img.paste(colour, (x0, y0, x0 + mask.width, y0 + mask.height), mask)
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
