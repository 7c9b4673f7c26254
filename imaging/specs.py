"""The augmentation's parameters and constants: importable without Pillow, torch or the C
library, so that reading a configuration stays light.

GoogLeNet ("Going Deeper with Convolutions", 2014) training augmentation:

* geometric (``CropSpec``): random crop of 8%..100% of the image area with aspect ratio in
  [3/4, 4/3], resized with a randomly drawn interpolation, random mirror;
* photometric (``PhotometricSpec``): Howard (2013) brightness/contrast/saturation in random
  order, optionally AlexNet's PCA lighting noise;
* evaluation: resize shorter side, centre crop (``crops.center_crop_array``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

INTERPOLATIONS = ("bilinear", "area", "nearest", "bicubic")  # paper: resize method drawn at random
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_range(name: str, value, lo_min: float, hi_max: float = math.inf, open_lo: bool = False) -> None:
    ok = isinstance(value, tuple) and len(value) == 2
    if ok:
        lo, hi = value
        ok = (lo > lo_min if open_lo else lo >= lo_min) and lo <= hi <= hi_max
    if not ok:
        raise ValueError(f"invalid {name}={value!r}: expected a (lo, hi) tuple with "
                         f"{lo_min} {'<' if open_lo else '<='} lo <= hi <= {hi_max}")


# ----------------------------------------------------------------------------- geometry

@dataclass(frozen=True)
class CropSpec:
    area: tuple[float, float] = (0.08, 1.0)  # fraction of the image area, uniform
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio w/h, log-uniform
    interpolations: tuple[str, ...] = INTERPOLATIONS
    flip: bool = True

    def __post_init__(self) -> None:
        _check_range("area", self.area, 0.0, 1.0, open_lo=True)
        _check_range("ratio", self.ratio, 0.0, open_lo=True)
        if not self.interpolations or any(i not in INTERPOLATIONS for i in self.interpolations):
            raise ValueError(f"invalid interpolations={self.interpolations!r}: expected a "
                             f"non-empty subset of {INTERPOLATIONS}")


@dataclass(frozen=True)
class CropParams:
    left: int
    top: int
    width: int
    height: int
    interpolation: str
    flip: bool


# ----------------------------------------------------------------------------- photometric

@dataclass(frozen=True)
class PhotometricSpec:
    brightness: tuple[float, float] | None = (0.5, 1.5)  # None = off
    contrast: tuple[float, float] | None = (0.5, 1.5)
    saturation: tuple[float, float] | None = (0.5, 1.5)
    random_order: bool = True  # Howard 2013: the three in random order per image
    lighting_std: float = 0.0  # AlexNet PCA lighting noise std (0 = off; paper-era value 0.1)

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) is not None:
                _check_range(name, getattr(self, name), 0.0)
        if not self.lighting_std >= 0:
            raise ValueError(f"invalid lighting_std={self.lighting_std!r}: must be >= 0")

    @property
    def ranges(self):
        return (self.brightness, self.contrast, self.saturation)
