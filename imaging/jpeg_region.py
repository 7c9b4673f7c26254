"""Region-of-interest JPEG decoding with libjpeg-turbo (``jpeg_region.c``) and Pillow's
resampling in C (``resample.c``), through ctypes.

Pillow can decode a JPEG at 1/2, 1/4 or 1/8 scale but only as a whole; a training crop
covers on average half the image. ``decode_region`` decodes just the MCU rows and columns
around a rectangle of the (scaled) image, and ``resample`` resizes a box of it with Pillow's
filters and arithmetic, straight from and to numpy arrays and about 3x faster than Pillow
(``benchmarks/bench_resample.py``). The library is optional: build it with

    python -m imaging.jpeg_region build

(a C compiler and libjpeg-turbo's headers, Debian's ``libjpeg62-turbo-dev``); where it is not
built, ``available()`` is false and the callers decode with Pillow as before.
"""
from __future__ import annotations

import ctypes
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

SOURCES = [Path(__file__).with_name("jpeg_region.c"), Path(__file__).with_name("resample.c")]
LIBRARY = Path(__file__).with_name("libjpeg_region.so")
MESSAGE_BYTES = 200  # libjpeg's JMSG_LENGTH_MAX
# resample.c's filters: Pillow's BOX (area averaging when shrinking), BILINEAR and BICUBIC.
FILTERS = {"area": 0, "bilinear": 1, "bicubic": 2}


class RegionDecodeError(RuntimeError):
    """libjpeg refused the image (or warned about it); Pillow decides what to do with it."""


def _load(path: Path):
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    if not all(hasattr(lib, name) for name in ("resample_rgb", "jpeg_add_restarts")):
        warnings.warn(f"{path} was built by an older version of this project and is not used (Pillow decodes "
                      "instead): rebuild it with 'python -m imaging.jpeg_region build'", stacklevel=2)
        return None
    size_p, int_p = ctypes.c_ulong, ctypes.POINTER(ctypes.c_int)
    lib.jpeg_region_info.argtypes = [ctypes.c_char_p, size_p, int_p, int_p, int_p, ctypes.c_char_p]
    lib.jpeg_region_decode.argtypes = [ctypes.c_char_p, size_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                       ctypes.c_int, ctypes.c_int, ctypes.c_void_p, size_p, int_p, int_p,
                                       ctypes.c_char_p]
    lib.jpeg_add_restarts.argtypes = [ctypes.c_char_p, size_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(size_p),
                                      ctypes.c_char_p]
    lib.jpeg_region_free.argtypes = [ctypes.c_void_p]
    lib.resample_rgb.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_long, *[ctypes.c_float] * 4,
                                 ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_long]
    return lib


_lib = _load(LIBRARY) if LIBRARY.is_file() else None


def available() -> bool:
    return _lib is not None


def use_library(path: Path | None) -> bool:
    """Decode with the library at ``path`` from now on (None: with none, i.e. Pillow); whether
    it loaded. For tests and for a library built elsewhere."""
    global _lib
    _lib = _load(path) if path is not None else None
    return _lib is not None


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def jpeg_size(data: bytes) -> tuple[int, int, int]:
    """(width, height, components) from the JPEG header."""
    width, height, components = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    message = ctypes.create_string_buffer(MESSAGE_BYTES)
    if _lib.jpeg_region_info(data, len(data), ctypes.byref(width), ctypes.byref(height), ctypes.byref(components),
                             message):
        raise RegionDecodeError(message.value.decode(errors="replace"))
    return width.value, height.value, components.value


def scaled_size(width: int, height: int, scale: int) -> tuple[int, int]:
    """libjpeg's output size at 1/scale: the last pixel may be partial, and counts."""
    return -(-width // scale), -(-height // scale)


def decode_region(data: bytes, width: int, scale: int, left: int, top: int, right: int,
                  bottom: int) -> tuple[np.ndarray, int]:
    """RGB uint8 [bottom - top, W, 3] holding columns left..right - 1 (and a few more: libjpeg
    decodes whole MCUs) of rows top..bottom - 1 of the image (``width`` pixels wide) scaled by
    1/``scale``; returns it with the column its first pixel has in the scaled image."""
    columns, rows = right - left, bottom - top
    out = np.empty((rows, scaled_size(width, 1, scale)[0], 3), dtype=np.uint8)  # room for any MCU alignment
    first, decoded = ctypes.c_int(), ctypes.c_int()
    message = ctypes.create_string_buffer(MESSAGE_BYTES)
    status = _lib.jpeg_region_decode(data, len(data), scale, left, top, columns, rows, out.ctypes.data, out.nbytes,
                                     ctypes.byref(first), ctypes.byref(decoded), message)
    if status == -2:
        raise RegionDecodeError("CMYK/YCCK JPEG: no RGB conversion in libjpeg")
    if status == -3:
        raise RegionDecodeError("uncommon chroma sampling: cropped decoding would differ from a full one")
    if status:
        raise RegionDecodeError(message.value.decode(errors="replace"))
    # The rows were written packed at the decoded width: view them as such.
    region = out.reshape(-1)[: rows * decoded.value * 3].reshape(rows, decoded.value, 3)
    return region, first.value


def add_restarts(data: bytes) -> bytes | None:
    """The JPEG rewritten losslessly (the same DCT coefficients, hence the same pixels) with a
    restart marker after every MCU and optimised Huffman tables, so that ``decode_region`` needs
    to Huffman-decode only the MCUs around a crop (see jpeg_region.c); other markers (EXIF, ICC,
    comments) are dropped. None for CMYK and uncommon chroma samplings, which the loader leaves
    to Pillow; RegionDecodeError where libjpeg refuses the data."""
    out, size = ctypes.c_void_p(), ctypes.c_ulong()
    message = ctypes.create_string_buffer(MESSAGE_BYTES)
    status = _lib.jpeg_add_restarts(data, len(data), ctypes.byref(out), ctypes.byref(size), message)
    if status in (-2, -3):
        return None
    if status:
        raise RegionDecodeError(message.value.decode(errors="replace"))
    try:
        return ctypes.string_at(out, size.value)
    finally:
        _lib.jpeg_region_free(out)


def resample(pixels: np.ndarray, box: tuple[float, float, float, float], size: int, interpolation: str,
             mirror: bool = False) -> np.ndarray:
    """The ``box`` of an RGB uint8 [H, W, 3] array (rows may be strided) resized to uint8
    [size, size, 3] with ``interpolation`` ("area", "bilinear" or "bicubic") and, with ``mirror``,
    flipped left to right, as Pillow's ``Image.fromarray(pixels).resize((size, size), filter,
    box=box)`` (then ``transpose(FLIP_LEFT_RIGHT)``) computes it: the same
    weights and 22-bit fixed-point sums, horizontal pass first (Pillow 13 goes vertical first for
    some inputs, portrait images among them, which rounds the intermediate differently: a level
    or two, more where a bicubic overshoot is clipped)."""
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8 or pixels.strides[1:] != (3, 1):
        raise ValueError(f"resample needs packed RGB uint8 rows, not {pixels.dtype} {pixels.shape} "
                         f"with strides {pixels.strides}")
    out = np.empty((size, size, 3), dtype=np.uint8)
    status = _lib.resample_rgb(pixels.ctypes.data, pixels.shape[1], pixels.shape[0], pixels.strides[0], *box, size,
                               size, FILTERS[interpolation], int(mirror), out.ctypes.data, out.strides[0])
    if status == -2:
        raise ValueError(f"box {box} is not inside the {pixels.shape[1]}x{pixels.shape[0]} image")
    if status:
        raise MemoryError(f"resampling {box} of a {pixels.shape[1]}x{pixels.shape[0]} image to {size}px")
    return out


def build(target: Path = LIBRARY) -> Path:
    """Compile ``jpeg_region.c`` and ``resample.c`` into ``target`` (a shared library linked to
    libjpeg). -O3 lets the compiler vectorise the resampling loops."""
    command = ["cc", "-O3", "-shared", "-fPIC", "-Wall", "-o", str(target), *map(str, SOURCES), "-ljpeg", "-lm"]
    subprocess.run(command, check=True)
    return target


if __name__ == "__main__":
    if sys.argv[1:] != ["build"]:
        raise SystemExit("usage: python -m imaging.jpeg_region build")
    print(f"built {build()}")
