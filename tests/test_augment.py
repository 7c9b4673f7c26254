"""Tests for the imaging layer: crop sampling, decoding, photometric distortion (GoogLeNet augmentation)."""
import io
import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF1
import torchvision.transforms.v2.functional as TF
from PIL import Image
from scipy import stats

from imaging.crops import apply_crop, decode_center_crop, decode_random_crop, random_resized_crop, sample_crop
from imaging.decode import draft_box
from imaging.photometric import PCA_EIGVAL, PCA_EIGVEC, color_jitter, draw_params, normalize, photometric_distort
from imaging.specs import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, CropParams, CropSpec, PhotometricSpec

# ----------------------------------------------------------------------------- helpers

def _encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient(w: int, h: int) -> Image.Image:
    """Smooth RGB image: R follows x, G follows y, B follows x + y."""
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, (x + y) / 2], -1).astype(np.uint8))


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return _encode(_gradient(2000, 1500), quality=95)


def _gray_batch(n: int, value: float = 0.4, hw: int = 2) -> torch.Tensor:
    return torch.full((n, 3, hw, hw), value)


# ----------------------------------------------------------------------------- sample_crop

@pytest.fixture(scope="module")
def crops():
    rng = random.Random(0)
    return [sample_crop(500, 375, CropSpec(), rng) for _ in range(20_000)]


def test_sample_crop_area_distribution(crops):
    frac = np.array([c.width * c.height / (500 * 375) for c in crops])
    # Rounding w and h to integers can shave a little off the lower bound.
    assert frac.min() >= 0.08 * 0.97 and frac.max() <= 1.0
    hist, _ = np.histogram(frac, bins=10, range=(0.08, 1.0))
    assert (hist > 0.005 * len(crops)).all(), hist  # hits in low, middle and high deciles
    # Uniform in area until wide/tall crops of most of the image stop fitting (then rejected
    # and redrawn, as in torchvision): the lower deciles are equally populated.
    low = hist[:5] / len(crops)
    assert low.min() > 0.11 and low.max() < 0.16, hist


def test_sample_crop_aspect_distribution(crops):
    aspect = np.array([c.width / c.height for c in crops])
    assert aspect.min() >= 0.75 * 0.98 and aspect.max() <= 4 / 3 * 1.02
    log_r = np.log(aspect)
    # Log-uniform before rejection; large tall crops are rejected on a 4:3 image, so only
    # ask for both halves and the extremes to be well populated.
    assert 0.3 < (log_r < 0).mean() < 0.7
    half = math.log(4 / 3)
    assert (log_r < -0.8 * half).mean() > 0.05 and (log_r > 0.8 * half).mean() > 0.05


def test_sample_crop_inside_image(crops):
    for c in crops:
        assert 0 <= c.left and 0 <= c.top and c.width > 0 and c.height > 0
        assert c.left + c.width <= 500 and c.top + c.height <= 375


def test_sample_crop_positions_cover_image(crops):
    centres = np.array([c.left + c.width / 2 for c in crops])
    assert centres.min() < 100 and centres.max() > 400


def test_sample_crop_interpolation_and_flip_frequencies(crops):
    counts = Counter(c.interpolation for c in crops)
    assert set(counts) == set(INTERPOLATIONS)
    for name in INTERPOLATIONS:
        assert abs(counts[name] / len(crops) - 0.25) < 0.02, counts
    assert abs(np.mean([c.flip for c in crops]) - 0.5) < 0.02


# Distribution checks against torchvision's RandomResizedCrop.get_params (which sample_crop
# follows step by step, fallback included): 20,000 draws of each on the same image, compared
# feature by feature with a chi-square test of homogeneity. CROP_ALPHA is the level: the
# deliberately wrong samplers below give p-values far under it (most < 1e-9).
CROP_DRAWS = 20_000
CROP_ALPHA = 1e-4
# A 4:3 photo, and a 10:3 strip on which most draws are rejected and some fall back.
CROP_IMAGES = [(500, 375), (400, 120)]
CROP_FEATURES = ("area", "log_aspect", "centre_x", "centre_y")


def crop_features(boxes, width: int, height: int) -> dict[str, np.ndarray]:
    """Relative area, log aspect ratio (w/h) and normalised centre of (top, left, h, w) boxes."""
    top, left, h, w = np.array(boxes, dtype=np.float64).T
    return {"area": h * w / (width * height), "log_aspect": np.log(w / h),
            "centre_x": (left + w / 2) / width, "centre_y": (top + h / 2) / height}


def same_distribution_p(a: np.ndarray, b: np.ndarray, bins: int = 30) -> float:
    """Chi-square test that two samples come from one distribution, on counts in bins cut at
    the pooled sample's quantiles (every bin well filled; discrete values may merge some)."""
    edges = np.unique(np.quantile(np.concatenate([a, b]), np.linspace(0, 1, bins + 1)))
    edges[0], edges[-1] = -np.inf, np.inf
    counts = np.stack([np.histogram(a, edges)[0], np.histogram(b, edges)[0]])
    return stats.chi2_contingency(counts[:, counts.sum(0) > 0])[1]


@pytest.fixture(scope="module")
def torchvision_crops() -> dict[tuple[int, int], dict[str, np.ndarray]]:
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    found = {}
    for width, height in CROP_IMAGES:
        image = torch.empty(1, height, width)
        boxes = [RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(CROP_DRAWS)]
        found[width, height] = crop_features(boxes, width, height)
    return found


def drawn_features(sampler, width: int, height: int) -> dict[str, np.ndarray]:
    rng = random.Random(1)
    return crop_features([sampler(width, height, rng) for _ in range(CROP_DRAWS)], width, height)


def ours(width, height, rng):
    c = sample_crop(width, height, CropSpec(), rng)
    return c.top, c.left, c.height, c.width


def variant(width, height, rng, *, area=(0.08, 1.0), log_uniform=True, clamp_corner=False, redraw=True, tries=10):
    """torchvision's algorithm written out again, with knobs for plausible mistakes."""
    lo, hi = 3 / 4, 4 / 3
    for _ in range(tries):
        target = width * height * rng.uniform(*area)
        aspect = math.exp(rng.uniform(math.log(lo), math.log(hi))) if log_uniform else rng.uniform(lo, hi)
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if not redraw:
            w, h = min(w, width), min(h, height)
        if 0 < w <= width and 0 < h <= height:
            if clamp_corner:
                return min(rng.randint(0, height - 1), height - h), min(rng.randint(0, width - 1), width - w), h, w
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    ratio = width / height
    w, h = (width, round(width / lo)) if ratio < lo else (round(height * hi), height) if ratio > hi else (width, height)
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("image", CROP_IMAGES)
@pytest.mark.parametrize("sampler", [ours, variant], ids=["sample_crop", "reference_variant"])
def test_sample_crop_distribution_matches_torchvision(torchvision_crops, image, sampler):
    drawn = drawn_features(sampler, *image)
    p = {f: same_distribution_p(drawn[f], torchvision_crops[image][f]) for f in CROP_FEATURES}
    assert min(p.values()) > CROP_ALPHA, p


@pytest.mark.parametrize("mistake, caught_by", [
    (dict(area=(0.10, 1.0)), ["area"]),
    (dict(area=(0.08, 0.9)), ["area"]),
    (dict(log_uniform=False), ["log_aspect"]),  # aspect ratio uniform instead of log-uniform
    (dict(clamp_corner=True), ["centre_x", "centre_y"]),  # corner anywhere, then pushed inside
    (dict(redraw=False), CROP_FEATURES),  # a crop too big is clamped to the image, not redrawn
    (dict(tries=3), ["area"]),  # the central fallback after 3 failed draws instead of 10
], ids=["area_from_0.10", "area_to_0.9", "uniform_aspect", "clamped_corner", "clamped_size", "3_tries"])
def test_crop_distribution_check_catches_wrong_samplers(torchvision_crops, mistake, caught_by):
    """The check above would fail for each of these mistakes, on both images."""
    for image in CROP_IMAGES:
        drawn = drawn_features(lambda w, h, rng: variant(w, h, rng, **mistake), *image)
        for feature in caught_by:
            assert same_distribution_p(drawn[feature], torchvision_crops[image][feature]) < CROP_ALPHA, (image, feature)


def test_sample_crop_no_flip_and_restricted_interpolations():
    rng = random.Random(1)
    spec = CropSpec(flip=False, interpolations=("bicubic",))
    params = [sample_crop(640, 480, spec, rng) for _ in range(2000)]
    assert not any(p.flip for p in params)
    assert {p.interpolation for p in params} == {"bicubic"}


@pytest.mark.parametrize("width, height", [(1000, 100), (100, 1000)])
def test_sample_crop_fallback_clamps_ratio_as_torchvision(width, height):
    # A 10:1 strip can never fit the (3/4, 4/3) ratio at the required area: fallback path,
    # which is deterministic, so it must be torchvision's box exactly.
    from torchvision.transforms import RandomResizedCrop

    p = sample_crop(width, height, CropSpec(area=(0.9, 1.0)), random.Random(0))
    assert sorted((p.height, p.width)) == [100, 133] and min(p.left, p.top) == 0
    expected = RandomResizedCrop.get_params(torch.empty(1, height, width), [0.9, 1.0], [3 / 4, 4 / 3])
    assert (p.top, p.left, p.height, p.width) == expected


def test_sample_crop_deterministic():
    a = [sample_crop(500, 375, CropSpec(), random.Random(42)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    seq1 = [sample_crop(500, 375, CropSpec(), r) for r in [random.Random(7)] * 50]
    seq2 = [sample_crop(500, 375, CropSpec(), r) for r in [random.Random(7)] * 50]
    assert seq1 == seq2 and len(set(seq1)) > 40


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("kwargs, field", [
    (dict(area=(0.0, 1.0)), "area"), (dict(area=(0.5, 0.2)), "area"), (dict(area=(0.1, 1.5)), "area"),
    (dict(ratio=(0.0, 1.0)), "ratio"), (dict(ratio=(2.0, 1.0)), "ratio"),
    (dict(interpolations=()), "interpolations"), (dict(interpolations=("lanczos",)), "interpolations"),
])
def test_crop_spec_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CropSpec(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(brightness=(-0.1, 1.0)), "brightness"), (dict(contrast=(1.5, 0.5)), "contrast"),
    (dict(saturation=(0.5,)), "saturation"), (dict(lighting_std=-0.1), "lighting_std"),
])
def test_photometric_spec_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PhotometricSpec(**kwargs)


def test_boundary_specs_are_accepted_and_act_as_they_say():
    def boxes(width, height):
        rng = random.Random(0)
        crops = [sample_crop(width, height, CropSpec(area=(1.0, 1.0), ratio=(1.0, 1.0)), rng) for _ in range(20)]
        return {(c.left, c.top, c.width, c.height) for c in crops}

    # Whole area at ratio 1: the full square image; on a 4:3 image no draw fits, so the
    # fallback takes the central square.
    assert boxes(64, 64) == {(0, 0, 64, 64)}
    assert boxes(80, 60) == {(10, 0, 60, 60)}
    # Contrast 0 blends every image into its mean grey; brightness and saturation off leave it so.
    spec = PhotometricSpec(brightness=None, contrast=(0.0, 0.0), saturation=None)
    x = torch.rand(3, 3, 5, 5)
    out = photometric_distort(x, spec, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, torch.stack([TF.adjust_contrast(i, 0.0) for i in x]), atol=1e-6, rtol=0)
    assert out.flatten(1).std(1).max() < 1e-6


# ----------------------------------------------------------------------------- crop / decode

@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"),
                                       ("RGBA", "PNG"), ("P", "PNG"), ("L", "PNG")])
def test_decode_random_crop_modes(mode, fmt):
    data = _encode(_gradient(300, 200).convert(mode), fmt)
    out = decode_random_crop(data, 48, CropSpec(), random.Random(3))
    assert out.shape == (3, 48, 48) and out.dtype == torch.uint8
    assert out.float().std() > 1  # actual image content, not an empty buffer


def test_random_resized_crop_pil_output():
    img = _gradient(320, 240).convert("L")
    out = random_resized_crop(img, 40, CropSpec(), random.Random(0))
    assert out.size == (40, 40) and out.mode == "RGB"


def test_decode_random_crop_deterministic(big_jpeg):
    a = decode_random_crop(big_jpeg, 32, CropSpec(), random.Random(5))
    b = decode_random_crop(big_jpeg, 32, CropSpec(), random.Random(5))
    c = decode_random_crop(big_jpeg, 32, CropSpec(), random.Random(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_flip_mirrors_output():
    img = _gradient(200, 200)
    p = CropParams(10, 20, 150, 120, "bilinear", False)
    plain = np.asarray(apply_crop(img, p, 32))
    flipped = np.asarray(apply_crop(img, CropParams(10, 20, 150, 120, "bilinear", True), 32))
    assert np.array_equal(plain[:, ::-1], flipped) and not np.array_equal(plain, flipped)


@pytest.mark.parametrize("params", [
    CropParams(100, 50, 1600, 1200, "bilinear", False),   # 1/8 decode
    CropParams(700, 300, 500, 600, "area", True),          # 1/4 decode
    CropParams(1, 3, 1999, 1497, "bicubic", False),        # odd edges
    CropParams(1500, 1000, 300, 260, "nearest", False),   # 1/2 decode
])
def test_draft_matches_full_decode(big_jpeg, params):
    drafted = Image.open(io.BytesIO(big_jpeg))
    fast = np.asarray(apply_crop(drafted, params, 64), dtype=np.float32)
    assert drafted.size[0] < 2000 and drafted.size[1] < 1500  # reduced decode really happened
    full = Image.open(io.BytesIO(big_jpeg))
    full.load()  # a loaded image cannot be drafted: reference at full resolution
    ref = np.asarray(apply_crop(full, params, 64), dtype=np.float32)
    assert full.size == (2000, 1500)
    assert np.abs(fast - ref).mean() < 1.5


def test_draft_scale_keeps_crop_at_least_size(big_jpeg):
    for box, size, expect in [((0, 0, 1600, 1200), 64, 8), ((0, 0, 600, 500), 64, 4),
                              ((0, 0, 300, 260), 64, 4), ((0, 0, 150, 130), 64, 2),
                              ((0, 0, 127, 500), 64, 1)]:
        img = Image.open(io.BytesIO(big_jpeg))
        new_box = draft_box(img, box, size)
        assert img.size == (math.ceil(2000 / expect), math.ceil(1500 / expect))
        assert min(new_box[2] - new_box[0], new_box[3] - new_box[1]) >= size
        assert np.allclose(new_box, np.array(box) / expect)


def test_draft_not_used_for_png():
    img = Image.open(io.BytesIO(_encode(_gradient(800, 600), "PNG")))
    assert draft_box(img, (0, 0, 800, 600), 32) == (0, 0, 800, 600) and img.size == (800, 600)


def test_decode_center_crop_geometry():
    # 600x400 grey picture with a 100x100 red square in the centre.
    a = np.full((400, 600, 3), 128, np.uint8)
    a[150:250, 250:350] = (255, 0, 0)
    out = decode_center_crop(_encode(Image.fromarray(a), "PNG"), 64).numpy()
    assert out.shape == (3, 64, 64)
    red = (out[0] > 200) & (out[1] < 60)
    # Shorter side 400 -> 73 (scale 73/400): square ~18 px, centred in the 64x64 crop.
    assert abs(red.sum() - (100 * 73 / 400) ** 2) < 60
    ys, xs = np.nonzero(red)
    assert abs(ys.mean() - 31.5) < 1 and abs(xs.mean() - 31.5) < 1
    assert (out[:, 0, 0] == 128).all() and (out[:, -1, -1] == 128).all()


@pytest.mark.parametrize("w, h, size, resize_to", [(600, 400, 64, None), (300, 500, 48, 60),
                                                    (2000, 1500, 64, None)])
def test_decode_center_crop_matches_torchvision(w, h, size, resize_to):
    img = _gradient(w, h)
    data = _encode(img, "JPEG", quality=95)
    out = decode_center_crop(data, size, resize_to)
    ref_img = Image.open(io.BytesIO(data)).convert("RGB")
    ref = TF1.center_crop(TF1.resize(ref_img, resize_to or round(size * 256 / 224)), size)
    ref = torch.from_numpy(np.array(ref)).permute(2, 0, 1)
    assert out.shape == (3, size, size) and out.dtype == torch.uint8
    assert (out.float() - ref.float()).abs().mean() < 1.5


def test_decode_center_crop_rejects_small_resize():
    with pytest.raises(ValueError, match="resize_to"):
        decode_center_crop(_encode(_gradient(50, 50), "PNG"), 32, resize_to=30)


# ----------------------------------------------------------------------------- photometric

def test_photometric_shapes_dtype_range():
    spec = PhotometricSpec(lighting_std=0.1)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (5, 3, 16, 12), dtype=torch.uint8)
    out = photometric_distort(batch, spec, g)
    assert out.shape == batch.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    single = photometric_distort(batch[0], spec, g)
    assert single.shape == (3, 16, 12) and single.dtype == torch.float32


def test_photometric_uint8_equals_float():
    spec = PhotometricSpec(lighting_std=0.1)
    u8 = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    a = photometric_distort(u8, spec, torch.Generator().manual_seed(1))
    b = photometric_distort(u8.float() / 255, spec, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_photometric_does_not_modify_input():
    x = torch.rand(2, 3, 4, 4)
    before = x.clone()
    photometric_distort(x, PhotometricSpec(lighting_std=0.1))
    assert torch.equal(x, before)


def test_single_image_same_as_batch_of_one():
    x = torch.rand(3, 8, 8)
    spec = PhotometricSpec(lighting_std=0.1)
    a = photometric_distort(x, spec, torch.Generator().manual_seed(3))
    b = photometric_distort(x[None], spec, torch.Generator().manual_seed(3))
    assert torch.equal(a, b[0])


_TV_OPS = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
           "saturation": TF.adjust_saturation}


@pytest.mark.parametrize("k, name", list(enumerate(_TV_OPS)))
def test_each_op_matches_torchvision(k, name):
    """Public path with one op on: the drawn factors (replayed via _draw_params) reproduce
    torchvision's adjust_* image by image."""
    spec = PhotometricSpec(**{n: ((0.2, 1.8) if n == name else None) for n in _TV_OPS},
                           random_order=False)
    x = torch.rand(6, 3, 10, 9)
    out = photometric_distort(x, spec, torch.Generator().manual_seed(11))
    factors, _, _ = draw_params(6, spec, torch.Generator().manual_seed(11))
    assert len(set(factors[:, k].tolist())) == 6
    for i in range(6):
        ref = _TV_OPS[name](x[i], float(factors[i, k]))
        torch.testing.assert_close(out[i], ref, atol=1e-6, rtol=0)


def test_color_jitter_with_explicit_factors_matches_torchvision_chain():
    x = torch.rand(4, 3, 7, 7)
    factors = torch.tensor([[1.3, 0.6, 1.4], [0.5, 1.5, 0.7], [1.0, 1.0, 1.0], [1.5, 1.2, 0.0]])
    order = torch.tensor([[0, 1, 2], [2, 1, 0], [1, 0, 2], [1, 2, 0]])
    out = color_jitter(x, factors, order)
    fns = list(_TV_OPS.values())
    for i in range(4):
        ref = x[i]
        for k in order[i].tolist():
            ref = fns[k](ref, float(factors[i, k]))
        torch.testing.assert_close(out[i], ref, atol=1e-6, rtol=0)


def test_brightness_factor_range():
    spec = PhotometricSpec(contrast=None, saturation=None)
    out = photometric_distort(_gray_batch(4000), spec, torch.Generator().manual_seed(0))
    f = (out[:, 0, 0, 0] / 0.4).numpy()
    assert f.min() >= 0.5 - 1e-5 and f.max() <= 1.5 + 1e-5
    assert f.min() < 0.51 and f.max() > 1.49
    assert abs(f.mean() - 1.0) < 0.02 and abs(f.std() - 1 / math.sqrt(12)) < 0.02
    assert torch.allclose(out, out[:, :1, :1, :1].expand_as(out))  # one factor per image


def test_per_image_factors_independent():
    spec = PhotometricSpec(contrast=None, saturation=None)
    out = photometric_distort(_gray_batch(64), spec, torch.Generator().manual_seed(5))
    f = out[:, 0, 0, 0]
    assert len(set(f.tolist())) == 64
    assert abs(np.corrcoef(f[:-1].numpy(), f[1:].numpy())[0, 1]) < 0.4


def test_order_is_random():
    # Brightness 1.5 then contrast 0.5 differs from the reverse because of clamping.
    x = torch.tensor([0.9, 0.1]).view(1, 1, 1, 2).expand(300, 3, 1, 2).contiguous()
    factors = torch.tensor([[1.5, 0.5, 1.0]]).expand(300, 3)
    enabled = (True, True, False)

    def outcomes(random_order):
        _, order, _ = draw_params(300, PhotometricSpec(random_order=random_order),
                                     torch.Generator().manual_seed(2))
        out = color_jitter(x, factors, order, enabled)
        return Counter(tuple(round(v, 4) for v in o[0, 0].tolist()) for o in out), order

    results, order = outcomes(True)
    assert set(results) == {(0.7875, 0.3625), (1.0, 0.45)}
    assert min(results.values()) > 100
    perms = Counter(tuple(o) for o in order.tolist())
    assert len(perms) == 6 and min(perms.values()) > 25
    fixed, _ = outcomes(False)
    assert list(fixed) == [(0.7875, 0.3625)]  # brightness first, as listed


def test_batched_and_per_image_same_distribution():
    spec = PhotometricSpec(contrast=None, saturation=None)
    torch.manual_seed(0)
    single = torch.stack([photometric_distort(torch.full((3, 1, 1), 0.4), spec)
                          for _ in range(1500)])[:, 0, 0, 0] / 0.4
    batch = photometric_distort(_gray_batch(1500, hw=1), spec)[:, 0, 0, 0] / 0.4
    assert abs(single.mean() - batch.mean()) < 0.03
    assert abs(single.std() - batch.std()) < 0.03


def test_lighting_zero_is_identity():
    spec = PhotometricSpec(brightness=None, contrast=None, saturation=None, lighting_std=0.0)
    x = torch.rand(3, 3, 5, 5)
    assert torch.equal(photometric_distort(x, spec), x)


def test_lighting_offsets_follow_pca():
    spec = PhotometricSpec(brightness=None, contrast=None, saturation=None, lighting_std=0.1)
    n = 3000
    out = photometric_distort(_gray_batch(n, 0.5), spec, torch.Generator().manual_seed(9))
    offsets = out - 0.5
    assert torch.allclose(offsets, offsets[:, :, :1, :1].expand_as(offsets), atol=1e-6)
    d = offsets[:, :, 0, 0]  # [n, 3] per-image RGB offsets
    assert (d.abs().sum(1) > 0).all()
    # Offsets are dominated by the first (luminance) eigenvector: channels move together.
    corr = np.corrcoef(d.T.numpy())
    assert corr[0, 1] > 0.8 and corr[1, 2] > 0.8 and corr[0, 2] > 0.8
    # Projecting onto the eigenvectors recovers alpha * eigval with alpha ~ N(0, std).
    alpha = (d @ PCA_EIGVEC) / PCA_EIGVAL
    assert torch.allclose(alpha.std(0), torch.full((3,), 0.1), atol=0.01)
    assert alpha.mean(0).abs().max() < 0.01
    _, _, drawn = draw_params(n, spec, torch.Generator().manual_seed(9))
    torch.testing.assert_close(alpha, drawn, atol=2e-3, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_photometric_device_independent():
    spec = PhotometricSpec(lighting_std=0.1)
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    cpu = photometric_distort(x, spec, torch.Generator().manual_seed(4))
    gpu = photometric_distort(x.cuda(), spec, torch.Generator().manual_seed(4))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- normalize

def test_normalize_matches_torchvision():
    x = torch.rand(4, 3, 6, 5)
    ref = torch.stack([TF.normalize(i, list(IMAGENET_MEAN), list(IMAGENET_STD)) for i in x])
    torch.testing.assert_close(normalize(x), ref)
    torch.testing.assert_close(normalize(x[0]), ref[0])
    assert not torch.equal(normalize(x), x)


def test_pil_worker_path_matches_the_tensor_path_for_the_same_draws():
    """CPU loader workers distort with Pillow's uint8 enhancers; with the same generator seed
    they draw the same factors and order as the batched tensor path and give the same image
    up to uint8 rounding."""
    import numpy as np
    from PIL import Image

    from imaging.photometric import photometric_distort_pil

    rng = np.random.default_rng(0)
    smooth = np.clip(rng.normal(128, 40, (8, 8, 3)), 0, 255).astype(np.uint8)
    pil = Image.fromarray(smooth).resize((64, 48), Image.BICUBIC)
    tensor = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
    for spec in (PhotometricSpec(), PhotometricSpec(lighting_std=0.1)):
        for seed in range(20):
            ref = photometric_distort(tensor, spec, torch.Generator().manual_seed(seed))
            out = photometric_distort_pil(pil, spec, torch.Generator().manual_seed(seed))
            got = torch.from_numpy(np.array(out)).permute(2, 0, 1).float() / 255
            assert (got - ref).abs().mean() < 2.5 / 255, (seed, spec)  # Pillow truncates after each op
            assert (got - ref).abs().max() < 8 / 255, (seed, spec)
