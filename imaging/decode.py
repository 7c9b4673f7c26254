"""Decoding only what a crop needs: JPEG region decoding at a reduced scale, raw-pixel images
without decoding, and Pillow's resampling (in C where the library is built).

Every path (region decoder, Pillow's drafted decode, raw pixels) computes the same pixels for
the same box, so preparation, training and evaluation agree whatever is installed.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from . import jpeg_region

PIL_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,  # PIL's BOX filter is area averaging when downscaling
    "nearest": Image.Resampling.NEAREST,
    "bicubic": Image.Resampling.BICUBIC,
}
C_FILTERS = {resample: name for name, resample in PIL_FILTERS.items() if name in jpeg_region.FILTERS}
DRAFT_SCALES = (8, 4, 2)  # reductions libjpeg can do for free inside the IDCT


def draft_scale(box: tuple[float, float, float, float], size: int) -> int:
    """The largest JPEG reduction (8, 4, 2, else 1) after which ``box`` still spans >= ``size``
    pixels on both sides."""
    bw, bh = box[2] - box[0], box[3] - box[1]
    return next((s for s in DRAFT_SCALES if min(bw, bh) / s >= size), 1)


def draft_box(image: Image.Image, box: tuple[float, float, float, float], size: int):
    """Let libjpeg decode an unloaded JPEG at 1/2, 1/4 or 1/8 scale when the ``box`` region
    (full-resolution coordinates) still spans >= ``size`` pixels on both sides afterwards.

    Decoding at reduced scale skips most of the IDCT work, which dominates loader time for
    big photos. Returns ``box`` in the coordinates of the (possibly drafted) image.
    """
    if image.format not in ("JPEG", "MPO") or len(getattr(image, "tile", ())) != 1:
        return box  # not a JPEG, or already loaded: draft() would be a no-op or wrong
    scale = draft_scale(box, size)
    if scale == 1:
        return box
    full_w, full_h = image.size
    # Pillow picks the largest s with s <= full // requested, so this request yields exactly `scale`.
    res = image.draft("RGB", (full_w // scale, full_h // scale))
    if res is None:
        return box
    # Pillow reports the drafted image's extent as (0, 0, full_w / s, full_h / s): the true
    # scale of libjpeg's reduced decode (the last pixel may be partial), as used by thumbnail().
    _, (_, _, dw, dh) = res
    sx, sy = dw / full_w, dh / full_h
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def resize_box(image: Image.Image, box, size: int, resample) -> Image.Image:
    """Crop ``box`` and resize it to size x size in one pass, ending in RGB; with the C library's
    resampling where it is built (as the region decoder's path), so that every path computes the
    same pixels from the same decoded image."""
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")  # CMYK, palette, alpha, 16-bit: resample in RGB
    interpolation = C_FILTERS.get(resample)
    if interpolation is not None and jpeg_region.available():
        pixels = np.asarray(image.convert("RGB") if image.mode == "L" else image)
        return Image.fromarray(jpeg_region.resample(pixels, box, size, interpolation))
    out = image.resize((size, size), resample, box=box)
    return out if out.mode == "RGB" else out.convert("RGB")  # L: resize first, it is 3x cheaper


def raw_pixels(data: bytes) -> np.ndarray | None:
    """A binary PPM as written by Pillow ("P6\\n<w> <h>\\n255\\n" + RGB bytes) as uint8
    [h, w, 3], without a copy; None for anything else (Pillow then reads it)."""
    if data[:3] != b"P6\n":
        return None
    header = data[:64].split(b"\n", 3)
    try:
        width, height = map(int, header[1].split())
        if header[2] != b"255":
            return None
        offset = len(header[0]) + len(header[1]) + len(header[2]) + 3
        return np.frombuffer(data, np.uint8, width * height * 3, offset).reshape(height, width, 3)
    except ValueError:  # not the plain layout (comments, short data): Pillow decides
        return None


class EncodedImage:
    """An encoded image whose size is known before decoding, of which only the region a crop
    needs is decoded: a raw-pixel PPM (nothing to decode), or a JPEG when libjpeg-turbo's region
    decoder is built (``jpeg_region``). ``open`` returns None for anything else; the callers then
    decode with Pillow (``draft_box``), with the same crop geometry and resampling."""

    def __init__(self, data: bytes, width: int, height: int, pixels: np.ndarray | None):
        self.data, self.width, self.height, self.pixels = data, width, height, pixels

    @classmethod
    def open(cls, data: bytes) -> "EncodedImage | None":
        pixels = raw_pixels(data)
        if pixels is not None:
            return cls(data, pixels.shape[1], pixels.shape[0], pixels)
        if not (jpeg_region.available() and jpeg_region.is_jpeg(data)):
            return None
        try:
            width, height, components = jpeg_region.jpeg_size(data)
        except jpeg_region.RegionDecodeError:
            return None
        if components == 4 or width * height > (Image.MAX_IMAGE_PIXELS or math.inf):
            return None  # CMYK; or a decompression bomb that Pillow refuses (or warns about)
        return cls(data, width, height, None)

    def resize_box(self, box, size: int, interpolation: str, mirror: bool = False) -> np.ndarray | None:
        """``box`` (full-size coordinates) resized to uint8 [size, size, 3] with ``interpolation``
        (and mirrored), as ``resize_box`` after ``draft_box`` does it; None where libjpeg refuses
        the data (Pillow then decides)."""
        if self.pixels is not None:
            return resample_array(self.pixels, box, size, interpolation, mirror)
        scale = draft_scale(box, size)
        box = tuple(v / scale for v in box)
        width, height = jpeg_region.scaled_size(self.width, self.height, scale)
        # Pillow's filters read pixels around the box too (bicubic: 2 source pixels per output
        # pixel's width): decode a margin, so the result equals resizing the whole image.
        margin = 2 * math.ceil(max((box[2] - box[0]) / size, (box[3] - box[1]) / size, 1)) + 1
        left, top = max(int(box[0]) - margin, 0), max(int(box[1]) - margin, 0)
        right, bottom = min(math.ceil(box[2]) + margin, width), min(math.ceil(box[3]) + margin, height)
        try:
            region, left = jpeg_region.decode_region(self.data, self.width, scale, left, top, right, bottom)
        except jpeg_region.RegionDecodeError:
            return None
        box = (box[0] - left, box[1] - top, box[2] - left, box[3] - top)
        return resample_array(region, box, size, interpolation, mirror)


def resample_array(pixels: np.ndarray, box, size: int, interpolation: str, mirror: bool) -> np.ndarray:
    """Pillow's resize of ``box`` of an RGB array (then mirrored), in C where the library is
    built (not for nearest, which Pillow samples with its affine transform)."""
    if interpolation in jpeg_region.FILTERS and jpeg_region.available():
        return jpeg_region.resample(pixels, box, size, interpolation, mirror)
    out = np.asarray(Image.fromarray(pixels).resize((size, size), PIL_FILTERS[interpolation], box=box))
    return out[:, ::-1] if mirror else out
