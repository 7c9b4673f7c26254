"""The native library's check at load: one built from other sources than the checkout's (an
older checkout's) is refused with one warning line and Pillow decodes instead; ``native_status``
says in one line which holds, for the trainer's log."""
from __future__ import annotations

import io
import shutil
import subprocess
import warnings

import numpy as np
import pytest
from PIL import Image

from imaging import jpeg_region
from imaging.decode import EncodedImage

STATUS = "native JPEG region decoding and resampling"
BUILD = "python -m imaging.jpeg_region build"


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    """(a library built from edited copies of the sources, one built from the sources): the only
    two builds of this module."""
    root = tmp_path_factory.mktemp("native")
    edited = [root / source.name for source in jpeg_region.SOURCES]
    for source, copy in zip(jpeg_region.SOURCES, edited):
        shutil.copy(source, copy)
    with edited[1].open("a") as out:
        out.write("\n/* an edit the checkout does not have */\n")
    try:
        yield jpeg_region.build(root / "stale.so", edited), jpeg_region.build(root / "fresh.so")
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot build the native library here: {exc}")


@pytest.fixture(autouse=True)
def library_as_imported():
    yield
    jpeg_region.use_library(jpeg_region.LIBRARY)


def jpeg() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


def test_a_library_built_from_other_sources_is_refused_with_one_warning_line(libraries):
    stale, _ = libraries
    with pytest.warns(UserWarning) as caught:
        assert not jpeg_region.use_library(stale)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert str(stale) in messages[0] and f"'{BUILD}'" in messages[0] and "Pillow decodes instead" in messages[0]
    assert not jpeg_region.available()
    assert EncodedImage.open(jpeg()) is None  # the callers decode with Pillow
    assert jpeg_region.native_status() == (f"{STATUS}: off, Pillow decodes (stale: {stale} was built from other "
                                           f"sources; rebuild: {BUILD})")
    with warnings.catch_warnings(record=True) as again:  # once per file, not at every load
        warnings.simplefilter("always")
        assert not jpeg_region.use_library(stale)
    assert not again


def test_a_library_built_from_the_sources_is_used(libraries):
    _, fresh = libraries
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert jpeg_region.use_library(fresh)
    assert jpeg_region.native_status() == f"{STATUS}: on ({fresh})"
    assert EncodedImage.open(jpeg()) is not None
    pixels = np.random.default_rng(1).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(jpeg_region.resample(pixels, (1.5, 2.0, 29.0, 27.5), 17, "bicubic"),
                                  np.asarray(Image.fromarray(pixels).resize((17, 17), Image.Resampling.BICUBIC,
                                                                            box=(1.5, 2.0, 29.0, 27.5))))


def test_the_status_names_a_missing_library_and_why_one_failed_to_load(tmp_path):
    assert not jpeg_region.use_library(tmp_path / "libjpeg_region.so")
    assert jpeg_region.native_status() == f"{STATUS}: off, Pillow decodes (not built: {BUILD})"
    broken = tmp_path / "broken.so"
    broken.write_bytes(b"not a shared library")
    with pytest.warns(UserWarning, match=f"{broken} failed to load .*Pillow decodes instead"):
        assert not jpeg_region.use_library(broken)
    status = jpeg_region.native_status()
    assert status.startswith(f"{STATUS}: off, Pillow decodes (failed to load {broken}: ") and "\n" not in status
    assert "invalid ELF header" in status or "too short" in status
