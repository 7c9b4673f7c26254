"""Region-of-interest JPEG decoding with libjpeg-turbo (``jpeg_region.c``) and Pillow's
resampling in C (``resample.c``), through ctypes.

Pillow can decode a JPEG at 1/2, 1/4 or 1/8 scale but only as a whole; a training crop
covers on average half the image. ``decode_region`` decodes just the MCU rows and columns
around a rectangle of the (scaled) image, and ``resample`` resizes a box of it with Pillow's
filters and arithmetic, straight from and to numpy arrays and about 3x faster than Pillow
(``benchmarks/bench_resample.py``). torch's antialiased ``interpolate`` is no replacement: it
has no box filter, takes 2-3x C's time on 32 px crops (0.5-0.7x on 224 px ones), and is not
Pillow's at the crop's edges. The library is optional: build it with

    python -m imaging.jpeg_region build

(a C compiler and libjpeg-turbo's headers, Debian's ``libjpeg62-turbo-dev``); where it is not
built, ``available()`` is false and the callers decode with Pillow as before. The build embeds a
hash of the C sources: a library built from other sources (an older checkout) gives the same
pixels only by luck, so it is refused at load with one warning and Pillow decodes instead.
``native_status()`` says in one line which of these holds.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
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
BUILD_COMMAND = "python -m imaging.jpeg_region build"
STATUS = "native JPEG region decoding and resampling"


class RegionDecodeError(RuntimeError):
    """libjpeg refused the image (or warned about it); Pillow decides what to do with it."""


def source_hash(sources: list[Path] = SOURCES) -> str:
    """What the build embeds and the load checks: a hash of the C sources' bytes."""
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:16]


def _shown(path: Path) -> str:
    """``path`` relative to the working directory where it is under it (imaging/...)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


_warned: set[str] = set()


def _refuse(path: Path, why: str, message: str):
    """No library, with ``why`` for ``native_status`` and ``message`` warned once per file."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)
    return None, why


def _load(path: Path):
    """(the library at ``path``, None), or (None, why it is not used)."""
    if not Path(path).is_file():
        return None, f"not built: {BUILD_COMMAND}"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        error = str(exc).replace("\n", " ")
        return _refuse(path, f"failed to load {_shown(path)}: {error}",
                       f"{_shown(path)} failed to load ({error}); Pillow decodes instead")
    built_from = None
    if hasattr(lib, "jpeg_region_source_hash"):
        lib.jpeg_region_source_hash.restype = ctypes.c_char_p
        built_from = lib.jpeg_region_source_hash().decode()
    # Older builds lack the function: stale as well. Without the sources there is nothing to check.
    if all(source.is_file() for source in SOURCES) and built_from != source_hash():
        return _refuse(path, f"stale: {_shown(path)} was built from other sources; rebuild: {BUILD_COMMAND}",
                       f"{_shown(path)} was built from other sources than {_shown(SOURCES[0].parent)}/*.c and is "
                       f"not used (Pillow decodes instead): rebuild it with '{BUILD_COMMAND}'")
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
    return lib, None


# Not when run as the build command, which replaces the library it would warn about.
_lib, _why_not = _load(LIBRARY) if __name__ != "__main__" else (None, f"not loaded by {BUILD_COMMAND}")
_path = LIBRARY


def available() -> bool:
    return _lib is not None


def native_status() -> str:
    """One line for logs: whether the library is in use, else why Pillow decodes."""
    if _lib is not None:
        return f"{STATUS}: on ({_shown(_path)})"
    return f"{STATUS}: off, Pillow decodes ({_why_not})"


def use_library(path: Path | None) -> bool:
    """Decode with the library at ``path`` from now on (None: with none, i.e. Pillow); whether
    it loaded. For tests and for a library built elsewhere."""
    global _lib, _why_not, _path
    _lib, _why_not = _load(path) if path is not None else (None, "switched off by use_library(None)")
    _path = path
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


def build(target: Path = LIBRARY, sources: list[Path] = SOURCES) -> Path:
    """Compile ``sources`` into ``target`` (a shared library linked to libjpeg), with their
    hash for the check at load. -O3 lets the compiler vectorise the resampling loops. Written
    beside ``target`` and renamed over it, so that a process which has the old one loaded keeps
    a whole file."""
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    command = ["cc", "-O3", "-shared", "-fPIC", "-Wall", f'-DSOURCE_HASH="{source_hash(sources)}"',
               "-o", str(partial), *map(str, sources), "-ljpeg", "-lm"]
    try:
        subprocess.run(command, check=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


if __name__ == "__main__":
    if sys.argv[1:] != ["build"]:
        raise SystemExit(f"usage: {BUILD_COMMAND}")
    print(f"built {build()}")
