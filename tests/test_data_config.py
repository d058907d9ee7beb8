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


@pytest.mark.parametrize("changes, key", [
    ({"split": "tran"}, r"data\.split: expected one of train, test, train\+test, got 'tran'"),
    ({"eval_split": "val"}, r"data\.eval_split"),
    ({"loader": "gpu"}, r"data\.loader"),
    ({"image_size": -1}, r"data\.image_size"),
    ({"limit": -5}, r"data\.limit"),
    ({"num_workers": -1}, r"data\.num_workers"),
    ({"name": "cifar10", "classes": ["n01"]}, r"data\.classes: only the imagefolder"),
    ({"name": "imagefolder", "classes": ["a", "a"]}, r"data\.classes: lists a class twice"),
    ({"name": "cifar10", "stl10_unlabeled": True}, r"data\.stl10_unlabeled"),
])
def test_data_config_errors_name_the_key(changes, key):
    with pytest.raises(ValueError, match=key) as info:
        DataConfig(**changes).validate()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("changes, key", [
    ({"crop_scale": [0.5]}, r"augment\.crop_scale: expected a list of two"),
    ({"crop_scale": [0.9, 0.2]}, r"augment\.crop_scale"),
    ({"crop_ratio": [0.0, 1.0]}, r"augment\.crop_ratio"),
    ({"hflip_p": 1.5}, r"augment\.hflip_p: expected a probability"),
    ({"blur_p": [1.0, -0.1]}, r"augment\.blur_p"),
    ({"solarize_p": [0.0, 0.2, 0.3]}, r"augment\.solarize_p"),
    ({"hue": 0.6}, r"augment\.hue"),
    ({"brightness": -0.1}, r"augment\.brightness"),
    ({"blur_sigma": [0.0, 2.0]}, r"augment\.blur_sigma"),
    ({"affine_degrees": 200.0}, r"augment\.affine_degrees"),
    ({"affine_translate": 1.5}, r"augment\.affine_translate"),
    ({"affine_shear": 90.0}, r"augment\.affine_shear"),
    ({"elastic_sigma": 0.0}, r"augment\.elastic_sigma"),
])
def test_augment_config_errors_name_the_key(changes, key):
    with pytest.raises(ValueError, match=key) as info:
        AugmentConfig(**changes).validate()
    assert "\n" not in str(info.value)


def test_the_schema_imports_without_torch():
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, data.config; assert 'torch' not in sys.modules, 'data.config pulled in torch'"
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], check=True)
