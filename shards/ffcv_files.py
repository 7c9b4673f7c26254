"""FFCV's ``.beton`` files as this project reads them: the install hint, and whole images read
back from the file's own tables (for evaluation's crop stacks, ``verify`` and the tests)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .manifest import PrepError

FFCV_INSTALL_HINT = (
    "FFCV is not installed. It is optional; install it with 'bash scripts/setup.sh --ffcv' "
    "(apt-get install pkg-config libopencv-dev libturbojpeg0-dev, then pip install -e '.[ffcv]')"
)


def require_ffcv():
    try:
        import ffcv  # noqa: F401
    except ImportError as exc:
        raise PrepError(f"{FFCV_INSTALL_HINT} ({exc})") from None


def read_images(path: Path, start: int = 0, stop: int | None = None, as_ffcv_decodes: bool = False):
    """(index, HxWx3 uint8 array, label) for samples start..stop-1 of a .beton, decoded as stored.

    FFCV's loader only hands out crops resized to one size; evaluation with several crops and
    the tests need each whole image, so it is read here from the file's own tables. JPEGs are
    decoded with Pillow, or with ``as_ffcv_decodes`` by FFCV's own libjpeg-turbo call (fast DCT,
    a few levels from Pillow's pixels), as its loader's decoders see them."""
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode
    from ffcv.reader import Reader
    from PIL import Image

    raw_mode = IMAGE_MODES["raw"]
    reader = Reader(str(path))
    meta = reader.metadata
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    stop = reader.num_samples if stop is None else stop
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for i in range(start, stop):
        m = meta["f0"][i]
        ptr, height, width = int(m["data_ptr"]), int(m["height"]), int(m["width"])
        if m["mode"] == raw_mode:
            pixels = np.array(data[ptr: ptr + height * width * 3]).reshape(height, width, 3)
        elif as_ffcv_decodes:  # the arguments of FFCV's decoders' call: whole image, no scaling, crop or flip
            pixels = np.empty((height, width, 3), dtype=np.uint8)
            if imdecode(data[ptr: ptr + sizes[ptr]], pixels, height, width, height, width, 0, 0, 1, 1, False, False):
                raise RuntimeError(f"{path}: sample {i}: FFCV cannot decode its JPEG")
        else:
            with Image.open(io.BytesIO(data[ptr: ptr + sizes[ptr]].tobytes())) as image:
                pixels = np.asarray(image.convert("RGB"))
        yield i, pixels, int(meta["f1"][i])
