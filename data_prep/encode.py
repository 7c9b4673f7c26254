"""Turn the bytes of one input file into the RGB JPEG stored in a shard, or a skip reason.

With ``raw_pixels`` the image is stored as its decoded RGB pixels instead (binary PPM: a
15-byte header, then the bytes), which the loader uses without decoding: for tiny images
(CIFAR's 32 px), where the JPEG decoder's fixed cost per image dominates.

ILSVRC2012 holds grayscale and CMYK JPEGs and PNG files named ``.JPEG``: those are converted
to RGB JPEG. Files that are already RGB JPEG within the size limit keep their original bytes
(no generation loss, and the fastest path), or with ``restart_markers`` their DCT coefficients:
rewritten losslessly with a restart marker after every MCU, so that the loader Huffman-decodes
only the part of the image a crop covers (``jpeg_region``). Anything that does not decode completely
(truncated, corrupt, empty, not an image, over :data:`MAX_INPUT_PIXELS`) raises
:class:`BadImage` with a reason to record. Images over :data:`MAX_STORED_PIXELS` are
downscaled, so that a shard never holds what the loader's Pillow refuses.
"""
from __future__ import annotations

import io
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image

from imaging import jpeg_region

# ImageNet's largest images are ~100 MP panoramas, over Pillow's default bomb guard: preparation
# decodes inputs up to this size (under pillow_limit, never by changing the process's default).
MAX_INPUT_PIXELS = 400_000_000
# Pillow's default limit (89,478,485): the most a default Pillow, hence plain webdataset
# decoding and the trainer's loader, reads without a DecompressionBombWarning.
MAX_STORED_PIXELS = Image.MAX_IMAGE_PIXELS


class BadImage(Exception):
    """The input cannot be decoded into an image; ``str(exc)`` is the recorded reason."""


@dataclass(frozen=True)
class EncodeSpec:
    resize_shorter: int | None = None  # shrink so the shorter side is at most this; never upscale
    quality: int = 90  # JPEG quality of re-encoded images
    raw_pixels: bool = False  # store decoded RGB pixels (PPM) instead of a JPEG
    reencode: bool = False  # re-encode every JPEG at ``quality`` (FFCV's storage), not only changed ones
    restart_markers: bool = False  # a restart marker after every MCU (lossless for kept JPEGs)


@dataclass(frozen=True)
class Encoded:
    data: bytes  # the stored image: an RGB JPEG, or a binary PPM with raw_pixels
    width: int
    height: int
    original_width: int
    original_height: int
    # why the image was changed (None: original bytes kept or, with raw_pixels, the same pixels
    # stored as such: that is the storage format, recorded in the manifest, not a conversion)
    converted: str | None


@contextmanager
def pillow_limit(limit: int | None):
    """Pillow's bomb guard at ``limit`` (None: off) for the block, then restored.

    Process-wide: fine in preparation, which decodes in worker processes, one image at a time."""
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def open_image(data: bytes, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode completely (a lazy open would accept truncated files) or raise BadImage.

    With ``draft_size``, a JPEG is decoded by libjpeg at the smallest 1/2, 1/4 or 1/8 scale that
    still covers that size: the entropy-coded stream is still read to its end, so damage is
    still detected, at a fraction of the cost of a full-size decode."""
    header(data)  # empty, unknown and too large inputs fail here, before any pixel is decoded
    try:
        # Pillow's own checks (frames, tiles) stay on, at the input limit.
        with warnings.catch_warnings(), pillow_limit(MAX_INPUT_PIXELS):
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if draft_size is not None and image.format == "JPEG":
                image.draft(image.mode, draft_size)
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"cannot decode: {exc}") from None
    return image


def header(data: bytes) -> tuple[str | None, str, tuple[int, int]]:
    """Format, mode and size from the header alone; inputs over MAX_INPUT_PIXELS are refused."""
    if not data:
        raise BadImage("empty file")
    try:
        # Nothing is decoded yet, so Pillow's guard is off: our check below names the size.
        with pillow_limit(None), Image.open(io.BytesIO(data)) as image:
            fmt, mode, (width, height) = image.format, image.mode, image.size
    except Image.UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"cannot decode: {exc}") from None
    if width * height > MAX_INPUT_PIXELS:
        raise BadImage(f"decompression bomb: {width}x{height} pixels, over the {MAX_INPUT_PIXELS} pixel limit for inputs")
    return fmt, mode, (width, height)


def target_size(width: int, height: int, resize_shorter: int | None) -> tuple[int, int]:
    if resize_shorter is None or min(width, height) <= resize_shorter:
        return width, height
    scale = resize_shorter / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def fit_pixels(width: int, height: int, limit: int) -> tuple[int, int]:
    """The largest size of the same aspect ratio with at most ``limit`` pixels."""
    if width * height <= limit:
        return width, height
    scale = math.sqrt(limit / (width * height))
    w = max(1, int(width * scale))
    h = max(1, min(int(height * scale), limit // w))  # float rounding may leave a row over
    return min(w, limit // h), h  # a very thin image: the max(1, ...) may have pushed it over


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparent images on white, as viewers show them, not on black.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def encode_jpeg(image: Image.Image, quality: int, restart_markers: bool = False) -> bytes:
    buffer = io.BytesIO()
    extra = {"restart_marker_blocks": 1, "optimize": True} if restart_markers else {}
    image.save(buffer, format="JPEG", quality=quality, **extra)
    return buffer.getvalue()


def with_restarts(data: bytes) -> bytes:
    """A kept JPEG with a restart marker after every MCU, the same pixels (``jpeg_region``); as
    it is where libjpeg declines (CMYK, uncommon samplings) or warns (Pillow accepted it, and the
    loader gives such files to Pillow)."""
    try:
        return jpeg_region.add_restarts(data) or data
    except jpeg_region.RegionDecodeError:
        return data


def encode_ppm(image: Image.Image) -> bytes:
    """RGB pixels as a binary PPM ("P6\\n<w> <h>\\n255\\n" + bytes; Pillow reads it too)."""
    return f"P6\n{image.width} {image.height}\n255\n".encode() + image.tobytes()


def store(image: Image.Image, spec: EncodeSpec) -> bytes:
    """An RGB image as stored in a shard."""
    return encode_ppm(image) if spec.raw_pixels else encode_jpeg(image, spec.quality, spec.restart_markers)


def encode(data: bytes, spec: EncodeSpec) -> Encoded:
    fmt, mode, (width, height) = header(data)
    new_size = target_size(width, height, spec.resize_shorter)
    reasons = []
    if fmt != "JPEG" and not spec.raw_pixels:
        reasons.append(f"{fmt or 'unknown'} to JPEG")
    if mode != "RGB":
        reasons.append(f"{mode} to RGB")
    if new_size[0] * new_size[1] > MAX_STORED_PIXELS:
        # The loader's Pillow warns about (and at twice the size refuses) anything larger.
        new_size = fit_pixels(width, height, MAX_STORED_PIXELS)
        reasons.append(f"downscaled from {width}x{height}: over {MAX_STORED_PIXELS} pixels, the most a default Pillow reads")
    elif new_size != (width, height):
        reasons.append(f"resized from {width}x{height}")
    if spec.reencode and not spec.raw_pixels and not reasons:
        reasons.append(f"re-encoded at quality {spec.quality}")
    if not reasons and not spec.raw_pixels:
        open_image(data, draft_size=(max(1, width // 8), max(1, height // 8)))  # integrity check only
        stored = with_restarts(data) if spec.restart_markers else data
        return Encoded(stored, width, height, width, height, None)
    image = to_rgb(open_image(data, draft_size=new_size))
    if image.size != new_size:
        image = image.resize(new_size, Image.BICUBIC, reducing_gap=3.0)
    return Encoded(store(image, spec), *new_size, width, height, ", ".join(reasons) or None)
