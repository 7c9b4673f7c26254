"""Crops as arrays or tensors from encoded image bytes: the training's random resized crop
(``specs.CropSpec``) and the evaluation's centre crop.

Geometric randomness comes from a caller-supplied ``random.Random`` so each sample can be made
deterministic without touching torch's global RNG.
"""
from __future__ import annotations

import io
import math
import random

import numpy as np
import torch
from PIL import Image

from .decode import PIL_FILTERS, EncodedImage, draft_box, resize_box
from .photometric import photometric_distort_pil
from .specs import CropParams, CropSpec, PhotometricSpec


def sample_crop(width: int, height: int, spec: CropSpec, rng: random.Random) -> CropParams:
    """torchvision's RandomResizedCrop.get_params, driven by ``rng``, plus interpolation and flip."""
    area = width * height
    log_lo, log_hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(*spec.area)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            break
    else:  # fallback: central crop, clamped to the ratio range
        in_ratio = width / height
        if in_ratio < spec.ratio[0]:
            w, h = width, int(round(width / spec.ratio[0]))
        elif in_ratio > spec.ratio[1]:
            w, h = int(round(height * spec.ratio[1])), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    interpolation = rng.choice(spec.interpolations)
    flip = spec.flip and rng.random() < 0.5
    return CropParams(left, top, w, h, interpolation, flip)


def apply_crop(image: Image.Image, params: CropParams, size: int) -> Image.Image:
    box = (params.left, params.top, params.left + params.width, params.top + params.height)
    box = draft_box(image, box, size)
    out = resize_box(image, box, size, PIL_FILTERS[params.interpolation])
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if params.flip else out


def random_resized_crop(image: Image.Image, size: int, spec: CropSpec, rng: random.Random) -> Image.Image:
    """Random crop (drawn on the full-size geometry) resized to size x size, RGB."""
    params = sample_crop(image.size[0], image.size[1], spec, rng)
    return apply_crop(image, params, size)


def _to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    # np.array copies (a small, already-resized image), giving a writable buffer for torch.
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def random_crop_array(data: bytes, size: int, spec: CropSpec, rng: random.Random) -> np.ndarray:
    """Encoded image bytes -> uint8 [size, size, 3] random resized crop (a mirrored view when
    flipped), decoding only what it needs where possible (``EncodedImage``), else with Pillow;
    the same crop and resampling either way."""
    encoded = EncodedImage.open(data)
    if encoded is None:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(random_resized_crop(image, size, spec, rng))
    params = sample_crop(encoded.width, encoded.height, spec, rng)
    box = (params.left, params.top, params.left + params.width, params.top + params.height)
    out = encoded.resize_box(box, size, params.interpolation, params.flip)
    if out is None:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(apply_crop(image, params, size))
    return out


def random_crop_image(data: bytes, size: int, spec: CropSpec, rng: random.Random) -> Image.Image:
    """``random_crop_array`` as a PIL image."""
    return Image.fromarray(np.ascontiguousarray(random_crop_array(data, size, spec, rng)))


def center_crop_array(data: bytes, size: int, resize_to: int | None = None) -> np.ndarray:
    """Evaluation transform: shorter side -> ``resize_to`` (bilinear), centre crop size x size,
    as uint8 [size, size, 3].

    Computed as a single box-resize of the source region that the centre crop covers, which
    samples the same pixel centres as resize-then-crop without resizing the discarded borders.
    """
    resize_to = round(size * 256 / 224) if resize_to is None else resize_to
    if resize_to < size:
        raise ValueError(f"invalid resize_to={resize_to}: must be >= size={size}")
    encoded = EncodedImage.open(data)
    if encoded is not None:
        out = encoded.resize_box(center_box(encoded.width, encoded.height, size, resize_to), size, "bilinear")
        if out is not None:
            return out
    with Image.open(io.BytesIO(data)) as image:
        box = draft_box(image, center_box(*image.size, size, resize_to), size)
        return np.asarray(resize_box(image, box, size, Image.Resampling.BILINEAR))


def center_crop_image(data: bytes, size: int, resize_to: int | None = None) -> Image.Image:
    """``center_crop_array`` as a PIL image."""
    return Image.fromarray(center_crop_array(data, size, resize_to))


def center_box(w: int, h: int, size: int, resize_to: int) -> tuple[float, float, float, float]:
    """The region of a w x h image that resize-shorter-side-to-``resize_to`` + centre crop keeps."""
    # torchvision's Resize(int): shorter side -> resize_to, longer side truncated.
    if w <= h:
        new_w, new_h = resize_to, int(resize_to * h / w)
    else:
        new_w, new_h = int(resize_to * w / h), resize_to
    left, top = int(round((new_w - size) / 2)), int(round((new_h - size) / 2))
    fx, fy = w / new_w, h / new_h
    return (left * fx, top * fy, (left + size) * fx, (top + size) * fy)


def decode_random_crop(jpeg_bytes: bytes, size: int, spec: CropSpec, rng: random.Random) -> torch.Tensor:
    """Encoded image bytes -> uint8 [3, size, size] random resized crop."""
    return _to_tensor(random_crop_array(jpeg_bytes, size, spec, rng))


def decode_center_crop(jpeg_bytes: bytes, size: int, resize_to: int | None = None) -> torch.Tensor:
    """``center_crop_array`` as uint8 [3, size, size]."""
    return _to_tensor(center_crop_array(jpeg_bytes, size, resize_to))


def decode_random_crop_distorted(jpeg_bytes: bytes, size: int, crop: CropSpec, rng: random.Random,
                                 photometric: PhotometricSpec, generator: torch.Generator) -> torch.Tensor:
    """Crop and photometric distortion of one image on the CPU -> uint8 [3, size, size]."""
    return _to_tensor(photometric_distort_pil(random_crop_image(jpeg_bytes, size, crop, rng), photometric, generator))


def eval_resize_for(image_size: int, eval_resize: int | None) -> int:
    """The shorter side an evaluation resizes to before its centre crop (256 for 224, as the paper)."""
    return eval_resize or round(image_size * 256 / 224)
