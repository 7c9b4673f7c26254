"""Photometric distortion (Howard 2013 brightness/contrast/saturation in random order, AlexNet's
PCA lighting) and normalisation: per image with Pillow for CPU workers, per batch in float for
the device (``distort_normalize``), all from the same random draws (``draw_params``).
"""
from __future__ import annotations

import torch
from PIL import Image, ImageEnhance

from .specs import IMAGENET_MEAN, IMAGENET_STD, PhotometricSpec

# AlexNet's PCA of ImageNet RGB pixels (values in [0, 1]); columns of PCA_EIGVEC are eigenvectors.
PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009],
                           [-0.5808, -0.0045, -0.8140],
                           [-0.5836, -0.6948, 0.4203]])
# torchvision's grayscale weights (ITU-R 601-2 luma; 0.2989 exactly as torchvision uses).
_GRAY = (0.2989, 0.587, 0.114)


def draw_params(n: int, spec: PhotometricSpec, generator: torch.Generator | None = None):
    """Per-image random draws on CPU: factors [n, 3] (brightness, contrast, saturation; 1 where
    an op is off), order [n, 3] (op index at each position) and lighting alpha [n, 3]."""
    u = torch.rand(n, 3, generator=generator)
    factors = torch.ones(n, 3)
    for k, rng in enumerate(spec.ranges):
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


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
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
    factors, order, alpha = draw_params(x.shape[0], spec, generator)
    x = color_jitter(x, factors, order, tuple(r is not None for r in spec.ranges))
    if alpha is not None:
        x = _lighting(x, alpha)
    return x.squeeze(0) if single else x


_PIL_ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)


def photometric_distort_pil(image: Image.Image, spec: PhotometricSpec,
                            generator: torch.Generator | None = None) -> Image.Image:
    """The same distortion for one RGB PIL image, in uint8 with Pillow's enhancers, for CPU
    loader workers: about 5x cheaper than the float path there. The draws (factors, order,
    lighting) come from the same ``draw_params``, so the distribution is the same; Pillow's
    ops are the same blends (with black, the mean grey, the greyscale image), truncated to
    uint8 after each op (on average 1-2 levels of 255 darker than the float path)."""
    factors, order, alpha = draw_params(1, spec, generator)
    enabled = [r is not None for r in spec.ranges]
    for k in order[0].tolist():
        if enabled[k]:
            image = _PIL_ENHANCERS[k](image).enhance(float(factors[0, k]))
    if alpha is not None:
        offset = ((alpha * PCA_EIGVAL) @ PCA_EIGVEC.T)[0].mul(255).tolist()
        bands = [band.point(lambda v, o=o: v + o) for band, o in zip(image.split(), offset)]
        image = Image.merge("RGB", bands)
    return image


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
    factors, order, alpha = draw_params(n, spec, generator)
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
