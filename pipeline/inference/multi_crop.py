"""Test-time crops: the paper's 144 (section 7 of *Going Deeper with Convolutions*), the usual 10,
and the trainer's single centre crop, as boxes first and pixels second.

The geometry is pure functions returning :class:`Crop` boxes, so that counts, positions and
sizes can be checked without images. Every size scales with the training resolution S
(``data.image_size``): the paper's numbers for 224-px crops become x S/224, so a model trained
on 32-px crops is tested the same way.

- 1 crop: the trainer's validation transform (shorter side -> ``eval_resize``, centre S x S).
- 10 crops: shorter side -> ``eval_resize``; the four corners and the centre, S x S, of the
  whole resized image, and their mirrors (torchvision's ``TenCrop`` after ``Resize``).
- 144 crops: shorter side -> 256, 288, 320 and 352 (x S/224); the left, centre and right squares
  (top, centre, bottom for portrait images); from each square the four corner and the centre
  S x S crops and the square itself resized to S x S; and their mirrors: 4 x 3 x 6 x 2.

The pixels follow the trainer of each storage format, so that the 1-crop row is the trainer's
validation number:

- WebDataset shards (:func:`crop_stack`): the 1 crop is the trainer's PIL transform (one bilinear
  box-resize, JPEG decoded at reduced scale where the trainer does); the 10 and 144 crops resize
  with torchvision's antialiased bilinear.
- FFCV files (:func:`ffcv_crop_stack`): the 1 crop is FFCV's ``CenterCropRGBImageDecoder``, which
  the trainer validates with: a centre square of S/``eval_resize`` of the shorter side of the
  stored image, resized to S x S with OpenCV's INTER_AREA. The 10 and 144 crops keep the geometry
  above and resize with INTER_AREA too, as FFCV resizes all its crops.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from imaging.decode import draft_box, resize_box
from imaging.photometric import normalize

CROP_COUNTS = (1, 10, 144)
PAPER_SCALES = (256, 288, 320, 352)  # shorter sides for 224-px crops (paper, section 7)

Box = tuple[int, int, int, int]  # left, top, width, height
Resize = Callable[[torch.Tensor, int, int], torch.Tensor]  # (uint8 [H, W, 3], width, height) -> [height, width, 3]


@dataclass(frozen=True)
class Crop:
    resized: tuple[int, int]  # (width, height) of the image after its shorter side is resized
    box: Box  # in the resized image; resized to S x S when it is larger
    flip: bool = False


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """torchvision's ``Resize(shorter)``: the shorter side becomes ``shorter``, the longer one
    keeps the aspect ratio, truncated."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def paper_scales(image_size: int) -> tuple[int, ...]:
    return tuple(round(s * image_size / 224) for s in PAPER_SCALES)


def five_boxes(region: Box, size: int) -> list[Box]:
    """The four corners (top-left, top-right, bottom-left, bottom-right) and the centre of
    ``region``, size x size (centre rounded as torchvision's ``center_crop``)."""
    left, top, width, height = region
    if size > min(width, height):
        raise ValueError(f"crop {size} does not fit in a {width}x{height} region")
    right, bottom = left + width - size, top + height - size
    centre = (left + int(round((width - size) / 2)), top + int(round((height - size) / 2)), size, size)
    return [(left, top, size, size), (right, top, size, size), (left, bottom, size, size),
            (right, bottom, size, size), centre]


def squares(width: int, height: int) -> list[Box]:
    """Left, centre and right squares of a landscape image; top, centre and bottom of a portrait one."""
    side = min(width, height)
    offsets = (0, int(round((max(width, height) - side) / 2)), max(width, height) - side)
    if width >= height:
        return [(o, 0, side, side) for o in offsets]
    return [(0, o, side, side) for o in offsets]


def _with_mirrors(crops: list[Crop]) -> list[Crop]:
    return crops + [replace(c, flip=True) for c in crops]


def centre_crop(width: int, height: int, image_size: int, eval_resize: int) -> list[Crop]:
    """The trainer's validation crop, as a box (it is rendered by :func:`centre_crop_pixels`)."""
    resized = resized_size(width, height, eval_resize)
    return [Crop(resized, five_boxes((0, 0, *resized), image_size)[4])]


def ffcv_centre_crop(width: int, height: int, image_size: int, eval_resize: int) -> list[Crop]:
    """The trainer's FFCV validation crop, as a box in the stored image: FFCV 1.0.2's
    ``get_center_crop`` with the ratio S / ``eval_resize`` that ``FFCVInput`` gives its
    ``CenterCropRGBImageDecoder`` (side truncated, offsets floor-halved), resized to S x S."""
    side = int(image_size / eval_resize * min(width, height))
    return [Crop((width, height), ((width - side) // 2, (height - side) // 2, side, side))]


def ten_crops(width: int, height: int, image_size: int, eval_resize: int) -> list[Crop]:
    resized = resized_size(width, height, eval_resize)
    return _with_mirrors([Crop(resized, box) for box in five_boxes((0, 0, *resized), image_size)])


def paper_crops(width: int, height: int, image_size: int) -> list[Crop]:
    crops = []
    for scale in paper_scales(image_size):
        resized = resized_size(width, height, scale)
        for square in squares(*resized):
            crops += [Crop(resized, box) for box in five_boxes(square, image_size)]
            crops.append(Crop(resized, square))  # the whole square, resized to S x S
    return _with_mirrors(crops)


def crop_plan(count: int, width: int, height: int, image_size: int, eval_resize: int) -> list[Crop]:
    if count == 1:
        return centre_crop(width, height, image_size, eval_resize)
    if count == 10:
        return ten_crops(width, height, image_size, eval_resize)
    if count == 144:
        return paper_crops(width, height, image_size)
    raise ValueError(f"crops: {count} is not one of {CROP_COUNTS}")


# ----------------------------------------------------------------------------- pixels
# Crops are uint8 in height x width x channel order, the layout images decode to: cutting and
# stacking them is then a copy of contiguous rows, about 1.4x faster than channel-first planes for
# 144 crops. The device puts the channels first (network_input), where a transpose is cheap.

def network_input(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 crops [N, S, S, 3] -> normalised float [N, 3, S, S] (contiguous, as the trainer's)."""
    return normalize(pixels.permute(0, 3, 1, 2).contiguous().float().div_(255))


def centre_crop_pixels(image: Image.Image, image_size: int, eval_resize: int) -> torch.Tensor:
    """The trainer's validation transform (``decode_center_crop``) on an opened image:
    one box-resize of the region that the centre crop covers, decoded at reduced JPEG scale when
    that leaves enough pixels, bilinear. uint8 [S, S, 3], the same pixels as the trainer's."""
    w, h = image.size
    (crop,) = centre_crop(w, h, image_size, eval_resize)
    fx, fy = w / crop.resized[0], h / crop.resized[1]
    left, top, size, _ = crop.box
    box = (left * fx, top * fy, (left + size) * fx, (top + size) * fy)
    box = draft_box(image, box, image_size)
    resized = resize_box(image, box, image_size, Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(resized, dtype=np.uint8))


def bilinear(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """torchvision's antialiased bilinear resize of uint8 [H, W, 3] (the WebDataset path)."""
    planes = image.permute(2, 0, 1)[None]  # a channels-last view: torch's fast uint8 resize path
    return F.resize(planes, [height, width], antialias=True)[0].permute(1, 2, 0)


def area(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """OpenCV's INTER_AREA resize of uint8 [H, W, 3], the call FFCV's decoders make (the FFCV path)."""
    import cv2  # installed with FFCV, which this path needs anyway

    return torch.from_numpy(cv2.resize(image.numpy(), (width, height), interpolation=cv2.INTER_AREA))


def render(image: torch.Tensor, crops: list[Crop], image_size: int, out: torch.Tensor | None = None,
           resize: Resize = bilinear) -> torch.Tensor:
    """uint8 image [H, W, 3] -> uint8 crops [len(crops), S, S, 3] (into ``out`` if given): each
    resize done once, each box cut once (its mirror is a flip of it), with ``resize``."""
    if out is None:
        out = torch.empty(len(crops), image_size, image_size, 3, dtype=torch.uint8)
    resized = {(image.shape[1], image.shape[0]): image}
    done: dict[tuple, tuple[int, bool]] = {}  # (resized, box) -> (index in out, flipped)
    for i, crop in enumerate(crops):
        key = (crop.resized, crop.box)
        if key in done:
            j, flipped = done[key]
            out[i] = out[j].flip(1) if crop.flip != flipped else out[j]
            continue
        if crop.resized not in resized:
            resized[crop.resized] = resize(image, *crop.resized)
        left, top, w, h = crop.box
        pixels = resized[crop.resized][top:top + h, left:left + w]
        if (w, h) != (image_size, image_size):
            pixels = resize(pixels, image_size, image_size)
        out[i] = pixels.flip(1) if crop.flip else pixels
        done[key] = (i, crop.flip)
    return out


def image_crops(image: Image.Image, count: int, image_size: int, eval_resize: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """The ``count`` test-time crops of one image (1: the trainer's centre crop), uint8 [count, S, S, 3]."""
    if count == 1:
        return centre_crop_pixels(image, image_size, eval_resize)[None]
    image = image.convert("RGB") if image.mode != "RGB" else image
    return render(torch.from_numpy(np.array(image, dtype=np.uint8)),
                  crop_plan(count, *image.size, image_size, eval_resize), image_size, out)


def crop_stack(image: Image.Image, count: int, image_size: int, eval_resize: int) -> torch.Tensor:
    """What the evaluation feeds the models for one image: the trainer's centre crop first, then
    (for 10 or 144) the test-time crops. uint8 [1 or 1 + count, S, S, 3]."""
    if count == 1:
        return image_crops(image, 1, image_size, eval_resize)
    stack = torch.empty(1 + count, image_size, image_size, 3, dtype=torch.uint8)
    stack[0] = centre_crop_pixels(_second_handle(image), image_size, eval_resize)
    image_crops(image, count, image_size, eval_resize, out=stack[1:])
    return stack


def ffcv_crop_stack(pixels: np.ndarray, count: int, image_size: int, eval_resize: int) -> torch.Tensor:
    """:func:`crop_stack` for an image of an FFCV file, uint8 [H, W, 3] as FFCV's loader decodes it:
    the trainer's FFCV centre crop first, then (for 10 or 144) the test-time crops, every resize
    INTER_AREA. uint8 [1 or 1 + count, S, S, 3]."""
    height, width = pixels.shape[:2]
    plan = ffcv_centre_crop(width, height, image_size, eval_resize)
    if count > 1:
        plan += crop_plan(count, width, height, image_size, eval_resize)
    return render(torch.from_numpy(pixels), plan, image_size, resize=area)


def _second_handle(image: Image.Image) -> Image.Image:
    """Another image object on the same still undecoded file. The centre crop may decode a JPEG at
    reduced scale, as the trainer does, and draft() sets that on the object it is called on; with
    its own object, ``image`` still decodes at full size for the other crops. (Opening seeks the
    shared file object to 0, and every decode seeks to its data.) A decoded image is returned as is."""
    if not getattr(image, "tile", None) or getattr(image, "fp", None) is None:
        return image
    return Image.open(image.fp)
