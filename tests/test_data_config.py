"""DataConfig / AugmentConfig: the schema the YAML loader relies on, and one-line errors naming the key."""
import dataclasses

import pytest

from data.config import AugmentConfig, DataConfig

LOADER_TYPES = {"str", "int", "float", "bool", "list[str]", "list[float]", "list[int]"}


@pytest.mark.parametrize("cls", [DataConfig, AugmentConfig])
def test_schema_is_keyword_only_with_plain_field_types(cls):
    for f in dataclasses.fields(cls):
        assert str(f.type) in LOADER_TYPES, f"{cls.__name__}.{f.name}: {f.type}"
    with pytest.raises(TypeError):
        cls("positional")
    cls().validate()  # the defaults are valid
    a, b = cls(), cls()
    for f in dataclasses.fields(cls):  # list defaults are not shared between instances
        if str(f.type).startswith("list"):
            assert getattr(a, f.name) is not getattr(b, f.name)


@pytest.mark.parametrize("changes, message", [
    ({"name": ""}, "data.name: must not be empty"),
    ({"split": "tran"}, "data.split: expected one of train, test, train+test, got 'tran'"),
    ({"eval_split": "val"}, "data.eval_split: expected one of train, test, train+test, got 'val'"),
    ({"loader": "gpu"}, "data.loader: expected one of device, workers, auto, got 'gpu'"),
    ({"image_size": -1}, "data.image_size: expected 0 (native) or a positive size, got -1"),
    ({"limit": -5}, "data.limit: expected 0 (all) or a positive count, got -5"),
    ({"num_workers": -1}, "data.num_workers: expected >= 0, got -1"),
    ({"name": "cifar10", "classes": ["n01"]},
     "data.classes: only the imagefolder dataset selects classes, not 'cifar10'"),
    ({"name": "imagefolder", "classes": ["a", "a"]}, "data.classes: lists a class twice: ['a', 'a']"),
    ({"name": "cifar10", "stl10_unlabeled": True},
     "data.stl10_unlabeled: only stl10 has unlabeled images, not 'cifar10'"),
])
def test_data_config_errors_name_the_key(changes, message):
    with pytest.raises(ValueError) as info:
        DataConfig(**changes).validate()
    assert str(info.value) == message


@pytest.mark.parametrize("changes, message", [
    ({"crop_scale": [0.5]}, "augment.crop_scale: expected a list of two numbers, got [0.5]"),
    ({"crop_scale": [0.9, 0.2]}, "augment.crop_scale: expected 0 < min <= max <= 1, got [0.9, 0.2]"),
    ({"crop_scale": [0.5, 1.01]}, "augment.crop_scale: expected 0 < min <= max <= 1, got [0.5, 1.01]"),
    ({"crop_ratio": [0.0, 1.0]}, "augment.crop_ratio: expected 0 < min <= max, got [0.0, 1.0]"),
    ({"crop_ratio": [1.5, 1.0]}, "augment.crop_ratio: expected 0 < min <= max, got [1.5, 1.0]"),
    ({"hflip_p": 1.5}, "augment.hflip_p: expected a probability in [0, 1], got 1.5"),
    ({"grayscale_p": -0.01}, "augment.grayscale_p: expected a probability in [0, 1], got -0.01"),
    ({"blur_p": [1.0, -0.1]}, "augment.blur_p: expected a probability in [0, 1], got -0.1"),
    ({"solarize_p": [0.0, 0.2, 0.3]}, "augment.solarize_p: expected a list of two numbers, got [0.0, 0.2, 0.3]"),
    ({"hue": 0.6}, "augment.hue: expected a value in [0, 0.5], got 0.6"),
    ({"hue": -0.1}, "augment.hue: expected a value in [0, 0.5], got -0.1"),
    ({"brightness": -0.1}, "augment.brightness: expected >= 0, got -0.1"),
    ({"saturation": -1.0}, "augment.saturation: expected >= 0, got -1.0"),
    ({"blur_sigma": [0.0, 2.0]}, "augment.blur_sigma: expected 0 < min <= max, got [0.0, 2.0]"),
    ({"blur_sigma": [2.0, 1.0]}, "augment.blur_sigma: expected 0 < min <= max, got [2.0, 1.0]"),
    ({"affine_degrees": 200.0}, "augment.affine_degrees: expected a value in [0, 180], got 200.0"),
    ({"affine_translate": 1.5}, "augment.affine_translate: expected a fraction in [0, 1], got 1.5"),
    ({"affine_shear": 90.0}, "augment.affine_shear: expected degrees in [0, 90), got 90.0"),
    ({"elastic_alpha": -1.0}, "augment.elastic_alpha: expected >= 0, got -1.0"),
    ({"elastic_sigma": 0.0}, "augment.elastic_sigma: expected > 0, got 0.0"),
    ({"cutout_size": -1}, "augment.cutout_size: expected 0 (off) or a positive count, got -1"),
])
def test_augment_config_errors_name_the_key(changes, message):
    with pytest.raises(ValueError) as info:
        AugmentConfig(**changes).validate()
    assert str(info.value) == message


@pytest.mark.parametrize("changes", [
    {"image_size": 0, "num_workers": 0, "limit": 0}, {"name": "imagefolder", "classes": []},
    {"name": "imagefolder", "classes": ["a", "b"]}, {"name": "stl10", "stl10_unlabeled": True}], ids=repr)
def test_the_least_data_values_load(changes):
    DataConfig(**changes).validate()


@pytest.mark.parametrize("changes", [
    {"crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0], "blur_sigma": [0.5, 0.5]},  # fixed, not drawn
    {"crop_scale": [1e-6, 1e-6]},
    {"hflip_p": 0.0, "jitter_p": 0.0, "grayscale_p": 0.0, "elastic_p": 0.0, "blur_p": [0.0, 0.0],
     "solarize_p": [0.0, 0.0]},
    {"hflip_p": 1.0, "jitter_p": 1.0, "grayscale_p": 1.0, "elastic_p": 1.0, "blur_p": [1.0, 1.0],
     "solarize_p": [1.0, 1.0]},
    {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0},  # the jitter off, op by op
    {"hue": 0.5, "affine_degrees": 180.0, "affine_translate": 1.0, "affine_shear": 89.9},
    {"affine_degrees": 0.0, "affine_translate": 0.0, "affine_shear": 0.0, "elastic_alpha": 0.0, "strong_ops": 0,
     "cutout_size": 0}], ids=repr)
def test_the_edge_augment_values_load(changes):
    """Each bound the errors above quote holds at the bound itself: equal min and max, 0 for off, 1 for always."""
    AugmentConfig(**changes).validate()


def test_the_eval_split_and_the_per_sample_steps():
    assert DataConfig(split="train+test").resolved_eval_split == "train+test"  # empty: the training split
    assert DataConfig(split="train", eval_split="test").resolved_eval_split == "test"
    # strong ops or Cutout exist only per sample, unless random views are off (no augmentation at all)
    cases = {(True, 0, 0): False, (True, 4, 0): True, (True, 0, 16): True, (False, 4, 16): False}
    for (random_views, strong_ops, cutout_size), per_sample in cases.items():
        aug = AugmentConfig(random_views=random_views, strong_ops=strong_ops, cutout_size=cutout_size)
        assert aug.per_sample_only is per_sample, (random_views, strong_ops, cutout_size)


def test_the_schema_imports_without_torch():
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, data.config; assert 'torch' not in sys.modules, 'data.config pulled in torch'"
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], check=True)
