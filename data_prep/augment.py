"""GoogLeNet ("Going Deeper with Convolutions", 2014) training augmentation.

One implementation shared by the shard writer (baked augmented copies), the
trainer's CPU loader workers and its device-side batch transforms:

* geometric: random crop of 8%..100% of the image area with aspect ratio in
  [3/4, 4/3], resized with a randomly drawn interpolation, random mirror;
* photometric: Howard (2013) brightness/contrast/saturation in random order,
  optionally AlexNet's PCA lighting noise;
* evaluation: resize shorter side, centre crop.

Geometric randomness comes from a caller-supplied ``random.Random`` so each
sample can be made deterministic without touching torch's global RNG.
"""
from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance

from . import jpeg_region

INTERPOLATIONS = ("bilinear", "area", "nearest", "bicubic")  # paper: resize method drawn at random
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# AlexNet's PCA of ImageNet RGB pixels (values in [0, 1]); columns of PCA_EIGVEC are eigenvectors.
PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009],
                           [-0.5808, -0.0045, -0.8140],
                           [-0.5836, -0.6948, 0.4203]])

_PIL_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,  # PIL's BOX filter is area averaging when downscaling
    "nearest": Image.Resampling.NEAREST,
    "bicubic": Image.Resampling.BICUBIC,
}
_C_FILTERS = {resample: name for name, resample in _PIL_RESAMPLE.items() if name in jpeg_region.FILTERS}
_DRAFT_SCALES = (8, 4, 2)  # reductions libjpeg can do for free inside the IDCT
# torchvision's grayscale weights (ITU-R 601-2 luma; 0.2989 exactly as torchvision uses).
_GRAY = (0.2989, 0.587, 0.114)


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


def draft_scale(box: tuple[float, float, float, float], size: int) -> int:
    """The largest JPEG reduction (8, 4, 2, else 1) after which ``box`` still spans >= ``size``
    pixels on both sides."""
    bw, bh = box[2] - box[0], box[3] - box[1]
    return next((s for s in _DRAFT_SCALES if min(bw, bh) / s >= size), 1)


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
    interpolation = _C_FILTERS.get(resample)
    if interpolation is not None and jpeg_region.available():
        pixels = np.asarray(image.convert("RGB") if image.mode == "L" else image)
        return Image.fromarray(jpeg_region.resample(pixels, box, size, interpolation))
    out = image.resize((size, size), resample, box=box)
    return out if out.mode == "RGB" else out.convert("RGB")  # L: resize first, it is 3x cheaper


def _apply_crop(image: Image.Image, params: CropParams, size: int) -> Image.Image:
    box = (params.left, params.top, params.left + params.width, params.top + params.height)
    box = draft_box(image, box, size)
    out = resize_box(image, box, size, _PIL_RESAMPLE[params.interpolation])
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if params.flip else out


def random_resized_crop(image: Image.Image, size: int, spec: CropSpec, rng: random.Random) -> Image.Image:
    """Random crop (drawn on the full-size geometry) resized to size x size, RGB."""
    params = sample_crop(image.size[0], image.size[1], spec, rng)
    return _apply_crop(image, params, size)


def _to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    # np.array copies (a small, already-resized image), giving a writable buffer for torch.
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


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
            return _resample(self.pixels, box, size, interpolation, mirror)
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
        return _resample(region, box, size, interpolation, mirror)


def _resample(pixels: np.ndarray, box, size: int, interpolation: str, mirror: bool) -> np.ndarray:
    """Pillow's resize of ``box`` of an RGB array (then mirrored), in C where the library is
    built (not for nearest, which Pillow samples with its affine transform)."""
    if interpolation in jpeg_region.FILTERS and jpeg_region.available():
        return jpeg_region.resample(pixels, box, size, interpolation, mirror)
    out = np.asarray(Image.fromarray(pixels).resize((size, size), _PIL_RESAMPLE[interpolation], box=box))
    return out[:, ::-1] if mirror else out


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
            return np.asarray(_apply_crop(image, params, size))
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
    def _ranges(self):
        return (self.brightness, self.contrast, self.saturation)


def _draw_params(n: int, spec: PhotometricSpec, generator: torch.Generator | None = None):
    """Per-image random draws on CPU: factors [n, 3] (brightness, contrast, saturation; 1 where
    an op is off), order [n, 3] (op index at each position) and lighting alpha [n, 3]."""
    u = torch.rand(n, 3, generator=generator)
    factors = torch.ones(n, 3)
    for k, rng in enumerate(spec._ranges):
        if rng is not None:
            factors[:, k] = rng[0] + (rng[1] - rng[0]) * u[:, k]
    if spec.random_order:
        order = torch.argsort(torch.rand(n, 3, generator=generator), dim=1)
    else:
        order = torch.arange(3).expand(n, 3)
    alpha = torch.randn(n, 3, generator=generator) * spec.lighting_std if spec.lighting_std > 0 else None
    return factors, order, alpha


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)
    return r.mul(_GRAY[0]).add_(g, alpha=_GRAY[1]).add_(b, alpha=_GRAY[2]).unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f + other * (1.0 - f)).clamp_(0.0, 1.0)


_OPS = (
    lambda x, f: (x * f).clamp_(0.0, 1.0),  # brightness
    lambda x, f: _blend(x, _gray(x).mean(dim=(-3, -2, -1), keepdim=True), f),  # contrast
    lambda x, f: _blend(x, _gray(x), f),  # saturation
)


def _color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                  enabled: tuple[bool, bool, bool] = (True, True, True)) -> torch.Tensor:
    """Apply brightness/contrast/saturation with explicit per-image ``factors`` [N, 3] in the
    per-image ``order`` [N, 3] to float images [N, 3, H, W] in [0, 1]."""
    n = x.shape[0]
    f_dev = factors.to(device=x.device, dtype=x.dtype).view(n, 3, 1, 1, 1)
    for pos in range(3):
        for k in range(3):
            if not enabled[k]:
                continue
            sel = order[:, pos] == k  # CPU tensor: no device sync to pick images
            count = int(sel.sum())
            if count == n:
                x = _OPS[k](x, f_dev[:, k])
            elif count:
                idx = sel.nonzero().squeeze(1).to(x.device)
                x = x.index_copy(0, idx, _OPS[k](x.index_select(0, idx), f_dev[idx, k]))
    return x


def photometric_distort(images: torch.Tensor, spec: PhotometricSpec,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Random per-image colour distortion of uint8 (0..255) or float (0..1) images [3,H,W] or
    [N,3,H,W] on any device; returns float32 in [0, 1], same shape.

    Random numbers are drawn on CPU so results do not depend on the images' device, and a
    single image runs through the batched code as a batch of one (same distribution).
    """
    single = images.dim() == 3
    x = images.unsqueeze(0) if single else images
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape [3,H,W] or [N,3,H,W], got {tuple(images.shape)}")
    x = x.to(torch.float32, copy=True)  # own copy: ops below never touch the caller's tensor
    if images.dtype == torch.uint8:
        x.div_(255.0)
    factors, order, alpha = _draw_params(x.shape[0], spec, generator)
    x = _color_jitter(x, factors, order, tuple(r is not None for r in spec._ranges))
    if alpha is not None:
        x = _lighting(x, alpha)
    return x.squeeze(0) if single else x


_PIL_ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)


def photometric_distort_pil(image: Image.Image, spec: PhotometricSpec,
                            generator: torch.Generator | None = None) -> Image.Image:
    """The same distortion for one RGB PIL image, in uint8 with Pillow's enhancers, for CPU
    loader workers: about 5x cheaper than the float path there. The draws (factors, order,
    lighting) come from the same ``_draw_params``, so the distribution is the same; Pillow's
    ops are the same blends (with black, the mean grey, the greyscale image), truncated to
    uint8 after each op (on average 1-2 levels of 255 darker than the float path)."""
    factors, order, alpha = _draw_params(1, spec, generator)
    enabled = [r is not None for r in spec._ranges]
    for k in order[0].tolist():
        if enabled[k]:
            image = _PIL_ENHANCERS[k](image).enhance(float(factors[0, k]))
    if alpha is not None:
        offset = ((alpha * PCA_EIGVAL) @ PCA_EIGVEC.T)[0].mul(255).tolist()
        bands = [band.point(lambda v, o=o: v + o) for band, o in zip(image.split(), offset)]
        image = Image.merge("RGB", bands)
    return image


def decode_random_crop_distorted(jpeg_bytes: bytes, size: int, crop: CropSpec, rng: random.Random,
                                 photometric: PhotometricSpec, generator: torch.Generator) -> torch.Tensor:
    """Crop and photometric distortion of one image on the CPU -> uint8 [3, size, size]."""
    return _to_tensor(photometric_distort_pil(random_crop_image(jpeg_bytes, size, crop, rng), photometric, generator))


def _lighting(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """AlexNet PCA lighting: add PCA_EIGVEC @ (alpha * PCA_EIGVAL) to every pixel of each image."""
    rgb = (alpha * PCA_EIGVAL) @ PCA_EIGVEC.T  # [N, 3]; row i = EIGVEC @ (alpha_i * EIGVAL)
    return (x + rgb.to(device=x.device, dtype=x.dtype).view(-1, 3, 1, 1)).clamp_(0.0, 1.0)


def normalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Float [0, 1] images [3,H,W] or [N,3,H,W] -> (x - mean) / std per channel."""
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return images.sub(mean).div_(std)


# The same distortion as arithmetic over the whole batch, for the device: each op is a blend
# x * f + other * (1 - f) with black (brightness), the image's mean grey (contrast) or its
# greyscale (saturation), so the op at each of the three positions of an image's order is
# chosen by per-image weights instead of by selecting images (no gathers or scatters, no
# host-side counts); torch.compile fuses it with the uint8 conversion and the normalisation.
BLEND_COLUMNS = 12  # per image: 3 factors, 3 contrast weights, 3 saturation weights, 3 lighting offsets


def blend_params(n: int, spec: PhotometricSpec, generator: torch.Generator | None = None) -> torch.Tensor:
    """``photometric_distort``'s draws for ``n`` images (the same draws from the same generator)
    as float32 [n, BLEND_COLUMNS] on the CPU: for positions 0..2 of each image's order, the
    factor of the op there, whether it is contrast, whether it is saturation; then the lighting
    offset per channel. An op that is off has factor 1, which leaves the image as it is."""
    factors, order, alpha = _draw_params(n, spec, generator)
    offset = (alpha * PCA_EIGVAL) @ PCA_EIGVEC.T if alpha is not None else torch.zeros(n, 3)
    return torch.cat([factors.gather(1, order), order.eq(1).float(), order.eq(2).float(), offset], dim=1)


def distort_normalize(images: torch.Tensor, params: torch.Tensor | None, mean: torch.Tensor, std: torch.Tensor,
                      dtype: torch.dtype = torch.float32,
                      memory_format: torch.memory_format = torch.channels_last) -> torch.Tensor:
    """uint8 images [N,3,H,W] (contiguous or channels_last) -> distorted (``blend_params`` on the
    images' device; None: not distorted) and normalised (``mean``, ``std`` [1,3,1,1] on the
    device) in ``dtype`` and ``memory_format``. Computed in float32, as ``photometric_distort``
    then ``normalize``, which it equals for the same draws up to float rounding."""
    # uint8 -> float32 in the model's memory format, in one pass, then in place: on a CPU,
    # out-of-place ops with broadcast constants over channels_last took 2-3x as long.
    x = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=memory_format)
    x.copy_(images)
    if params is None:  # (x / 255 - mean) / std as one multiply-add
        return x.mul_(1.0 / (255.0 * std)).add_(-mean / std).to(dtype)
    x.div_(255.0)
    p = params.view(-1, BLEND_COLUMNS, 1, 1)
    for pos in range(3):
        f, contrast, saturation = p[:, pos:pos + 1], p[:, 3 + pos:4 + pos], p[:, 6 + pos:7 + pos]
        gray = _gray(x)
        other = contrast * gray.mean(dim=(-3, -2, -1), keepdim=True) + saturation * gray
        x = (x * f + other * (1.0 - f)).clamp(0.0, 1.0)
    x = (x + p[:, 9:12]).clamp(0.0, 1.0)
    return x.sub_(mean).div_(std).to(dtype)
