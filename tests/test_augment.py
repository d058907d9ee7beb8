"""Batched augmentation against torchvision's functional ops on single images with the same parameters."""
import math

import pytest
import torch
import torchvision.transforms as T1
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from data.augment import (AugmentParams, BatchAugment, EvalTransform, adjust_colour_batch, blur_kernel_size,
                          build_sample_transform, elastic_displacement, normalize, sample_crop_boxes)
from data import augment as augment_module
from data.config import AugmentConfig

BILINEAR = TF.InterpolationMode.BILINEAR
NO_RANDOMNESS = dict(crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], hflip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                     blur_p=[0.0, 0.0], solarize_p=[0.0, 0.0])
MEAN3, STD3 = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _augment(channels: int = 3, size: int = 32, view: int = 0, **cfg) -> BatchAugment:
    mean, std = (MEAN3, STD3) if channels == 3 else ((0.3,), (0.3,))
    return BatchAugment(AugmentConfig(**cfg), image_size=size, channels=channels, mean=mean, std=std, view=view)


def _smooth(batch: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    freq = torch.rand(batch, channels, 3, generator=g) * 3
    return 0.5 + 0.4 * torch.sin(freq[..., 0, None, None] * 3 * xx + freq[..., 1, None, None] * 3 * yy
                                 + freq[..., 2, None, None])


def _identity(batch, size, **changes) -> AugmentParams:
    return AugmentParams.identity(batch, size, size).replace(**changes)


@pytest.mark.parametrize("channels, in_size, out_size, dtype", [(1, 28, 28, torch.uint8), (3, 32, 32, torch.uint8),
                                                                (3, 32, 24, torch.float32), (1, 28, 40, torch.uint8)])
def test_output_shape_dtype_device(channels, in_size, out_size, dtype):
    images = torch.randint(0, 256, (5, channels, in_size, in_size), dtype=torch.uint8)
    if dtype == torch.float32:
        images = images / 255.0
    out = _augment(channels, out_size, affine_degrees=10, elastic_p=0.5, elastic_alpha=20, blur_p=[0.5, 0.5])(images)
    assert out.shape == (5, channels, out_size, out_size) and out.dtype == torch.float32
    assert out.device == images.device and torch.isfinite(out).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_runs_on_the_gpu_with_a_gpu_generator():
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, device="cuda")
    aug = _augment(3, 32, blur_p=[1.0, 1.0], solarize_p=[0.5, 0.5])
    a = aug(images, torch.Generator(device="cuda").manual_seed(3))
    b = aug(images, torch.Generator(device="cuda").manual_seed(3))
    assert a.device.type == "cuda" and torch.equal(a, b)


def test_sync_free_accelerator_paths_give_the_same_views(monkeypatch):
    """The branches taken on accelerators (no host reads: blur everything with a vanishing sigma, hue
    rotation under a mask, always resample) give the CPU branches' result."""
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    aug = _augment(3, 32, blur_p=[0.5, 0.5], solarize_p=[0.5, 0.5])
    on_cpu = aug(images, torch.Generator().manual_seed(0))
    monkeypatch.setattr(augment_module, "_sync_free", lambda device: True)
    torch.testing.assert_close(aug(images, torch.Generator().manual_seed(0)), on_cpu, atol=1e-5, rtol=0)
    plain = _augment(3, 32, **NO_RANDOMNESS)
    torch.testing.assert_close(plain(images), normalize(images / 255.0, plain.mean, plain.std), atol=1e-5, rtol=0)


def test_every_image_gets_its_own_parameters():
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    out = _augment(3, 32)(image.expand(16, -1, -1, -1), torch.Generator().manual_seed(0))
    flat = out.flatten(1)
    distances = torch.cdist(flat, flat) + torch.eye(16) * 1e9
    assert distances.min() > 1e-3  # no two of the 16 copies got the same view


@pytest.mark.parametrize("channels", [1, 3])
def test_without_randomness_the_output_is_the_normalised_input(channels):
    images = torch.randint(0, 256, (6, channels, 28, 28), dtype=torch.uint8)
    aug = _augment(channels, 28, **NO_RANDOMNESS)
    expected = (images.float() / 255 - torch.tensor(aug.mean).view(1, -1, 1, 1)) / torch.tensor(aug.std).view(1, -1, 1, 1)
    torch.testing.assert_close(aug(images), expected, atol=1e-5, rtol=0)
    raw = _augment(channels, 28, normalize=False, **NO_RANDOMNESS)(images)
    torch.testing.assert_close(raw, images.float() / 255, atol=1e-6, rtol=0)


def test_reproducible_for_a_generator_seed():
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    aug = _augment(3, 32, blur_p=[0.5, 0.5], solarize_p=[0.3, 0.3], affine_degrees=20, elastic_p=0.5,
                   elastic_alpha=10)
    a = aug(images, torch.Generator().manual_seed(7))
    assert torch.equal(a, aug(images, torch.Generator().manual_seed(7)))
    assert not torch.allclose(a, aug(images, torch.Generator().manual_seed(8)))


@pytest.mark.parametrize("box", [(0, 0, 16, 20), (5, 7, 20, 12), (10, 3, 22, 29), (0, 0, 32, 32), (31, 31, 1, 1)])
@pytest.mark.parametrize("flip", [False, True])
def test_crop_and_flip_equal_torchvision(box, flip):
    images = torch.rand(2, 3, 32, 32)
    aug = _augment(3, 32, normalize=False)
    params = _identity(2, 32, crop=torch.tensor([box, box], dtype=torch.float32), flip=torch.tensor([flip, False]))
    out = aug.apply(images, params)
    for i in range(2):
        expected = TF.resized_crop(images[i], *box, size=[32, 32], interpolation=BILINEAR, antialias=True)
        if flip and i == 0:
            expected = TF.horizontal_flip(expected)
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("angle, translate, shear", [(20.0, (0, 0), 0.0), (0.0, (3, -2), 0.0), (0.0, (0, 0), 15.0),
                                                     (-35.0, (2, 1), -12.0)])
def test_affine_equals_torchvision(angle, translate, shear):
    images = torch.rand(1, 1, 28, 28)
    aug = _augment(1, 28, normalize=False, affine_degrees=40)
    params = _identity(1, 28, angle=torch.tensor([angle]), translate=torch.tensor([translate], dtype=torch.float32),
                       shear=torch.tensor([shear]))
    expected = TF.affine(images[0], angle=angle, translate=list(translate), scale=1.0, shear=[shear, 0.0],
                         interpolation=BILINEAR)
    torch.testing.assert_close(aug.apply(images, params)[0], expected, atol=1e-5, rtol=0)


def test_elastic_equals_torchvision_for_the_same_field():
    images = torch.rand(2, 1, 28, 28)
    field = elastic_displacement(2, 28, alpha=34.0, sigma=4.0, generator=torch.Generator().manual_seed(0),
                                 device=torch.device("cpu"))
    out = _augment(1, 28, normalize=False, elastic_p=1.0, elastic_alpha=34.0).apply(
        images, _identity(2, 28, displacement=field))
    for i in range(2):
        expected = TF.elastic(images[i], field[i:i + 1], interpolation=BILINEAR)
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sigma", [1.5, 4.0])  # at 4 px the field is drawn at half resolution, then upsampled
def test_elastic_fields_have_torchvision_statistics(sigma):
    torch.manual_seed(0)
    reference = torch.cat([T.ElasticTransform(30.0, sigma).make_params([torch.zeros(1, 28, 28)])["displacement"]
                           for _ in range(12)])  # torchvision takes ~60 ms a field here
    ours = elastic_displacement(12, 28, alpha=30.0, sigma=sigma, generator=torch.Generator().manual_seed(1),
                                device=torch.device("cpu"))

    def correlation(d, lag):   # of x-displacements `lag` pixels apart along a row
        return torch.corrcoef(torch.stack([d[:, :, :-lag, 0].flatten(), d[:, :, lag:, 0].flatten()]))[0, 1]

    assert ours.shape == reference.shape
    assert ours.std() == pytest.approx(reference.std(), rel=0.2)
    assert abs(ours.mean()) < 0.5 * ours.std()   # centred noise: no drift of the whole image
    # The smoothness: neighbours, and pixels sigma apart (where a field blurred twice as much stays near 1).
    assert correlation(ours, 1) == pytest.approx(correlation(reference, 1), abs=0.05)
    assert correlation(ours, round(sigma)) == pytest.approx(correlation(reference, round(sigma)), abs=0.1)
    # The size: alpha scales the field and nothing else.
    doubled = elastic_displacement(12, 28, alpha=60.0, sigma=sigma, generator=torch.Generator().manual_seed(1),
                                   device=torch.device("cpu"))
    torch.testing.assert_close(doubled, 2 * ours, rtol=1e-6, atol=1e-9)


def test_composed_geometry_is_close_to_torchvision_applied_in_turn():
    images = _smooth(3, 3, 32)
    box = torch.tensor([[4.0, 2.0, 24.0, 20.0], [0.0, 0.0, 32.0, 32.0], [8.0, 10.0, 12.0, 16.0]])
    flip = torch.tensor([True, False, True])
    angle, shear = torch.tensor([15.0, -30.0, 5.0]), torch.tensor([-10.0, 5.0, 0.0])
    translate = torch.tensor([[2.0, -1.0], [0.0, 3.0], [-2.0, 0.0]])
    out = _augment(3, 32, normalize=False, affine_degrees=30, affine_shear=10).apply(
        images, _identity(3, 32, crop=box, flip=flip, angle=angle, translate=translate, shear=shear))
    for i in range(3):
        expected = TF.resized_crop(images[i], *box[i].int().tolist(), size=[32, 32], antialias=True)
        expected = TF.horizontal_flip(expected) if flip[i] else expected
        expected = TF.affine(expected, angle=float(angle[i]), translate=translate[i].tolist(), scale=1.0,
                             shear=[float(shear[i]), 0.0], interpolation=BILINEAR)
        error = (out[i] - expected).abs()
        assert error.mean() < 0.01 and error.max() < 0.15  # one interpolation instead of two


def test_colour_jitter_equals_torchvision_adjust_ops():
    images = torch.rand(4, 3, 16, 16)
    factors = dict(brightness=torch.tensor([1.3, 1.0, 0.7, 0.9]), contrast=torch.tensor([1.0, 0.6, 1.4, 1.2]),
                   saturation=torch.tensor([1.0, 1.4, 0.6, 0.8]), hue=torch.tensor([0.0, 0.08, -0.1, 0.03]))
    out = adjust_colour_batch(images, **factors)
    for i in range(4):
        expected = TF.adjust_brightness(images[i], float(factors["brightness"][i]))
        expected = TF.adjust_contrast(expected, float(factors["contrast"][i]))
        expected = TF.adjust_saturation(expected, float(factors["saturation"][i]))
        expected = TF.adjust_hue(expected, float(factors["hue"][i]))
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)
    gray = torch.rand(2, 1, 16, 16)
    out = adjust_colour_batch(gray, brightness=torch.tensor([1.2, 0.8]), contrast=torch.tensor([0.7, 1.3]),
                              saturation=torch.tensor([1.4, 0.6]), hue=torch.tensor([0.1, -0.1]))
    for i, (b, c) in enumerate([(1.2, 0.7), (0.8, 1.3)]):
        expected = TF.adjust_contrast(TF.adjust_brightness(gray[i], b), c)
        torch.testing.assert_close(out[i], expected, atol=1e-6, rtol=0)


def test_grayscale_blur_solarize_equal_torchvision():
    images = torch.rand(3, 3, 32, 32)
    sigma = torch.tensor([0.0, 0.7, 1.9])
    params = _identity(3, 32, grayscale=torch.tensor([True, False, True]), blur_sigma=sigma,
                       solarize=torch.tensor([False, True, True]))
    out = _augment(3, 32, normalize=False).apply(images, params)
    for i in range(3):
        expected = images[i]
        if params.grayscale[i]:
            expected = TF.rgb_to_grayscale(expected, num_output_channels=3)
        if sigma[i] > 0:
            k = blur_kernel_size(32)
            expected = TF.gaussian_blur(expected, [k, k], [float(sigma[i])] * 2)
        if params.solarize[i]:
            expected = TF.solarize(expected, 0.5)
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)
    assert blur_kernel_size(32) == 3 and blur_kernel_size(96) == 9 and blur_kernel_size(224) == 23


def test_crop_boxes_follow_torchvision_distribution():
    n, scale, ratio = 4000, (0.08, 1.0), (0.75, 4 / 3)
    ours = sample_crop_boxes(n, 32, 32, scale, ratio, torch.Generator().manual_seed(0), torch.device("cpu"))
    torch.manual_seed(0)
    image = torch.zeros(3, 32, 32)
    theirs = torch.tensor([T1.RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(n)],
                          dtype=torch.float32)
    for boxes in (ours, theirs):
        top, left, h, w = boxes.unbind(1)
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    for column in range(4):
        assert ours[:, column].mean() == pytest.approx(theirs[:, column].mean(), abs=0.5)
    area = lambda b: (b[:, 2] * b[:, 3]).mean() / 1024  # noqa: E731
    assert area(ours) == pytest.approx(area(theirs), abs=0.02)
    assert torch.equal(ours, ours.round())


@pytest.mark.parametrize("height, width", [(20, 40), (40, 20), (30, 30), (32, 25)])
def test_crop_boxes_fall_back_to_torchvisions_centre_crop(height, width):
    """No box fits in ten tries (every area drawn exceeds the image's): torchvision's fallback, the centre crop
    with the aspect ratio clamped into `ratio`, for wide, tall and square images."""
    scale, ratio = (2.0, 3.0), (0.75, 4 / 3)
    ours = sample_crop_boxes(16, height, width, scale, ratio, torch.Generator().manual_seed(0), torch.device("cpu"))
    theirs = T1.RandomResizedCrop.get_params(torch.zeros(3, height, width), list(scale), list(ratio))
    assert ours.tolist() == [list(map(float, theirs))] * 16


def test_parameter_frequencies_and_ranges_follow_the_config():
    aug = _augment(3, 32, blur_p=[1.0, 0.1], solarize_p=[0.0, 0.2], affine_degrees=15, affine_translate=0.1,
                   affine_shear=10)
    p = aug.sample_params(4000, 32, 32, device="cpu", generator=torch.Generator().manual_seed(1))
    jittered = p.brightness != 1
    assert p.flip.float().mean() == pytest.approx(0.5, abs=0.03)
    assert jittered.float().mean() == pytest.approx(0.8, abs=0.03)
    assert p.grayscale.float().mean() == pytest.approx(0.2, abs=0.03)
    assert (p.blur_sigma > 0).all() and p.solarize is None  # off in view 0: not even drawn
    assert p.brightness[jittered].min() >= 0.6 and p.brightness.max() <= 1.4 and p.hue.abs().max() <= 0.1
    assert (p.hue[~jittered] == 0).all() and (p.contrast[~jittered] == 1).all()
    assert p.angle.abs().max() <= 15 and p.shear.abs().max() <= 10
    assert torch.equal(p.translate, p.translate.round()) and p.translate.abs().max() <= 3.2
    q = _augment(3, 32, view=1, blur_p=[1.0, 0.1], solarize_p=[0.0, 0.2]).sample_params(
        4000, 32, 32, device="cpu", generator=torch.Generator().manual_seed(1))
    assert (q.blur_sigma > 0).float().mean() == pytest.approx(0.1, abs=0.03)
    assert q.solarize.float().mean() == pytest.approx(0.2, abs=0.03)


def test_larger_images_are_shrunk_before_sampling():
    """A 96 px image viewed at 32 px without cropping equals torchvision's antialiased resize."""
    images = _smooth(2, 3, 96)
    out = _augment(3, 32, normalize=False, **NO_RANDOMNESS)(images)
    expected = TF.resize(images, [32, 32], interpolation=BILINEAR, antialias=True)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_sample_transform_matches_the_config():
    cfg = AugmentConfig(**NO_RANDOMNESS)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    transform = build_sample_transform(cfg, image_size=32, channels=3, mean=MEAN3, std=STD3)
    expected = normalize(image[None].float() / 255, MEAN3, STD3)[0]
    torch.testing.assert_close(transform(image), expected, atol=1e-5, rtol=0)
    strong = AugmentConfig(blur_p=[1.0, 0.1], solarize_p=[0.0, 0.2], affine_degrees=15, affine_translate=0.1,
                           elastic_p=0.5, elastic_alpha=20)
    for channels in (1, 3):
        transform = build_sample_transform(strong, image_size=24, channels=channels, mean=[0.5] * channels,
                                           std=[0.2] * channels, view=1)
        out = transform(torch.randint(0, 256, (channels, 40, 30), dtype=torch.uint8))
        assert out.shape == (channels, 24, 24) and out.dtype == torch.float32


def test_eval_transform_resizes_the_shorter_side_and_centre_crops():
    images = _smooth(2, 3, 48)[:, :, :, :40]  # 48 x 40
    out = EvalTransform(image_size=32, mean=MEAN3, std=STD3)(images)
    expected = TF.center_crop(TF.resize(images, [32], interpolation=BILINEAR, antialias=True), [32, 32])
    torch.testing.assert_close(out, normalize(expected, MEAN3, STD3), atol=1e-4, rtol=0)
    native = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(EvalTransform(image_size=28, mean=(0.1,), std=(0.3,))(native),
                               (native.float() / 255 - 0.1) / 0.3)
    assert math.isclose(float(EvalTransform(image_size=28, mean=(0.0,), std=(1.0,), normalize=False)(native).max()),
                        float(native.max()) / 255, rel_tol=1e-6)


# ------------------------------------------------------------------ SCAN's strong views (per-sample only)
def _pil_oracles(pil):
    from PIL import ImageEnhance, ImageOps

    return {"autocontrast": (0.0, ImageOps.autocontrast(pil)), "equalize": (0.0, ImageOps.equalize(pil)),
            "posterize": (5.0, ImageOps.posterize(pil, 5)), "solarize": (100.0, ImageOps.solarize(pil, 100)),
            "color": (0.3, ImageEnhance.Color(pil).enhance(0.3)),
            "contrast": (0.3, ImageEnhance.Contrast(pil).enhance(0.3)),
            "brightness": (0.3, ImageEnhance.Brightness(pil).enhance(0.3)),
            "sharpness": (0.3, ImageEnhance.Sharpness(pil).enhance(0.3)), "rotate": (20.0, pil.rotate(20)),
            "identity": (0.0, pil)}


def test_strong_ops_match_pillow():
    import numpy as np
    from PIL import Image

    from data.augment import STRONG_OPS, apply_strong_op

    image = torch.randint(30, 200, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    oracles = _pil_oracles(Image.fromarray(image.permute(1, 2, 0).numpy()))
    for name, (magnitude, expected) in oracles.items():
        out = apply_strong_op(image, name, magnitude)
        assert out.dtype == torch.uint8 and out.shape == image.shape
        diff = (out.int() - torch.from_numpy(np.array(expected)).permute(2, 0, 1).int()).abs()
        assert int(diff.max()) <= 1, name   # Pillow rounds the enhancement blends its own way
    # translation by a quarter of the side moves the content by 4 pixels and fills black
    right = apply_strong_op(image, "translate_x", 0.25)
    assert torch.equal(right[:, :, 4:], image[:, :, :-4]) and int(right[:, :, :4].max()) == 0
    assert torch.equal(apply_strong_op(image, "translate_y", -0.25)[:, :-4], image[:, 4:])
    sheared = apply_strong_op(image, "shear_x", 0.3)   # nearest sampling: every pixel is one of the image's, or 0
    assert not torch.equal(sheared, image)
    assert set(sheared.flatten().tolist()) <= set(image.flatten().tolist()) | {0}
    assert apply_strong_op(image, "solarize", 256.0) is image
    assert set(oracles) | {"shear_x", "shear_y", "translate_x", "translate_y"} == set(STRONG_OPS)


def test_random_strong_ops_draw_ops_and_magnitudes_from_the_seed(monkeypatch):
    import data.augment as augment

    calls = []
    monkeypatch.setattr(augment, "apply_strong_op", lambda image, name, magnitude: calls.append((name, magnitude))
                        or image)
    ops = augment.RandomStrongOps(4)
    torch.manual_seed(3)
    for _ in range(200):
        ops(torch.zeros(1, 4, 4, dtype=torch.uint8))
    assert len(calls) == 800
    assert {name for name, _ in calls} == set(augment.STRONG_OPS)   # every op drawn
    for name, magnitude in calls:
        low, high = augment.STRONG_OPS[name]
        assert low <= magnitude <= high
    rotations = [m for name, m in calls if name == "rotate"]
    assert min(rotations) < -20 and max(rotations) > 20                # magnitudes spread over the range
    torch.manual_seed(3)
    first = list(calls)
    calls.clear()
    for _ in range(200):
        ops(torch.zeros(1, 4, 4, dtype=torch.uint8))
    assert calls == first


def test_cutout_zeroes_one_clipped_square_of_random_side():
    from data.augment import Cutout

    torch.manual_seed(0)
    cutout = Cutout(5)
    sides = set()
    for _ in range(300):
        image = torch.rand(3, 12, 12) + 1.0
        out = cutout(image)
        hole = (out == 0).all(dim=0)
        rows, cols = hole.any(dim=1).nonzero().flatten(), hole.any(dim=0).nonzero().flatten()
        assert hole.sum() == len(rows) * len(cols)                                 # one filled rectangle
        assert len(rows) <= 5 and len(cols) <= 5
        assert torch.equal(out[:, ~hole], image[:, ~hole])                         # the rest is untouched
        if 0 < rows.min() and rows.max() < 11 and 0 < cols.min() and cols.max() < 11:
            assert len(rows) == len(cols)                                          # square unless clipped
            sides.add(len(rows))
    assert sides == {1, 2, 3, 4, 5}


def test_strong_views_need_the_per_sample_pipeline():
    from data.datasets import ImageData
    from data.loaders import WorkersLoader, build_train_loader

    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    data = ImageData(name="toy", labels=torch.zeros(64, dtype=torch.long), num_classes=1, class_names=["a"],
                     mean=(0.5,) * 3, std=(0.25,) * 3, channels=3, image_size=16, images=images)
    strong = AugmentConfig(strong_ops=4, cutout_size=8)
    common = dict(batch_size_per_rank=8, num_views=2, device="cpu", rank=0, world_size=1, seed=0, num_workers=0)
    loader = build_train_loader(data, strong, mode="auto", **common)
    assert isinstance(loader, WorkersLoader)
    views = next(iter(loader)).views
    assert views[0].shape == (8, 3, 16, 16) and bool((views[0] == 0).any())   # a Cutout hole in each view
    with pytest.raises(ValueError, match=r"data.loader=device: augment.strong_ops and augment.cutout_size exist only"):
        build_train_loader(data, strong, mode="device", **common)
    with pytest.raises(ValueError, match=r"augment.strong_ops: expected 0 \(off\) or a positive count, got -1"):
        AugmentConfig(strong_ops=-1).validate()
