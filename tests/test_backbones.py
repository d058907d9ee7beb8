"""The backbones against independent references: the ResNet trunks against torchvision's ResNets with
the same weights (the CIFAR stem against its 3x3/1 convolution applied by hand), the small CNN's map
sizes and layers, and `norm: none` removing every batch norm."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet18, resnet50

from models.backbones import BACKBONES, build_backbone, mlp


def batch_norms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("name, reference, width", [("resnet18", resnet18, 512), ("resnet50", resnet50, 2048)])
def test_the_imagenet_trunk_is_torchvisions_resnet_without_its_classifier(name, reference, width):
    trunk = build_backbone(name, in_channels=3, image_size=64, norm="batch")
    net = reference(weights=None)
    net.fc = nn.Identity()
    net.load_state_dict(trunk.net.state_dict())           # the same layers, names and shapes
    trunk.eval()
    net.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(trunk(x), net(x))
    assert trunk.out_dim == width and trunk(x).shape == (2, width)


def test_the_cifar_stem_is_a_3x3_stride_1_convolution_without_max_pool():
    trunk = build_backbone("resnet18_cifar", in_channels=3, image_size=32, norm="batch")
    net = trunk.net
    assert isinstance(net.maxpool, nn.Identity) and net.conv1.bias is None
    assert (net.conv1.kernel_size, net.conv1.stride, net.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    seen = {}
    net.layer1.register_forward_hook(lambda module, inputs, output: seen.update(layer1=output.shape))
    net.conv1.register_forward_hook(lambda module, inputs, output: seen.update(conv1=output))
    x = torch.randn(2, 3, 32, 32)
    trunk.eval()
    with torch.no_grad():
        trunk(x)
        by_hand = torch.zeros(2, 64, 32, 32)
        padded = nn.functional.pad(x, (1, 1, 1, 1))
        for dy in range(3):
            for dx in range(3):
                by_hand += torch.einsum("oc,bchw->bohw", net.conv1.weight[:, :, dy, dx],
                                        padded[:, :, dy:dy + 32, dx:dx + 32])
    torch.testing.assert_close(seen["conv1"], by_hand, rtol=1e-4, atol=1e-5)
    assert seen["layer1"] == (2, 64, 32, 32)              # 32 px reach layer1 whole (ImageNet stem: 8 px)
    standard = build_backbone("resnet18", in_channels=3, image_size=32, norm="batch")
    standard.net.layer1.register_forward_hook(lambda module, inputs, output: seen.update(layer1=output.shape))
    with torch.no_grad():
        standard.eval()(x)
    assert seen["layer1"] == (2, 64, 8, 8)


@pytest.mark.parametrize("name", ["resnet18", "resnet34_cifar", "small_cnn"])
def test_grey_images_get_a_one_channel_first_convolution(name):
    net = build_backbone(name, in_channels=1, image_size=28, norm="batch")
    first = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1
    if name == "resnet18":                                # the ImageNet stem's shape, one input channel
        assert (first.kernel_size, first.stride, first.padding, first.bias) == ((7, 7), (2, 2), (3, 3), None)
    with torch.no_grad():
        assert net.eval()(torch.rand(2, 1, 28, 28)).shape == (2, net.out_dim)


@pytest.mark.parametrize("name", sorted(BACKBONES.names()))
def test_norm_none_leaves_no_batch_norm_and_gives_the_convolutions_their_bias(name):
    image_size = 32
    with_norm = build_backbone(name, in_channels=3, image_size=image_size, norm="batch")
    plain = build_backbone(name, in_channels=3, image_size=image_size, norm="none")
    assert batch_norms(with_norm) and not batch_norms(plain)
    if not name.startswith("resnet"):   # ours: a bias only where no batch norm follows (torchvision's: never)
        assert all(m.bias is None for m in with_norm.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        assert all(m.bias is not None for m in plain.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    with torch.no_grad():
        assert plain(torch.rand(2, 3, image_size, image_size)).shape == (2, plain.out_dim)


@pytest.mark.parametrize("image_size, flat", [(28, 3), (32, 4), (96, 12), (8, 1)])
def test_the_small_cnn_pools_three_times_and_flattens_the_last_map(image_size, flat):
    for name, convs in (("small_cnn", 1), ("small_cnn_deep", 2)):
        net = build_backbone(name, in_channels=3, image_size=image_size, norm="batch")
        convolutions = [m for m in net.features if isinstance(m, nn.Conv2d)]
        assert [m.out_channels for m in convolutions] == [w for w in (32, 64, 128) for _ in range(convs)]
        assert all((m.kernel_size, m.padding) == ((3, 3), (1, 1)) for m in convolutions)
        with torch.no_grad():
            last_map = net.features(torch.rand(2, 3, image_size, image_size))
        assert last_map.shape == (2, 128, flat, flat)
        linear = net.fc[1]
        assert (linear.in_features, linear.out_features, net.out_dim) == (128 * flat * flat, 512, 512)
    with pytest.raises(ValueError, match=r"^small_cnn: image_size 7 is too small for three 2x poolings$"):
        build_backbone("small_cnn", in_channels=3, image_size=7, norm="batch")


def test_the_mlp_head_is_linear_bn_relu_linear():
    head = mlp(6, 5, 4)
    assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)] == [(6, 5), (5, 4)]
    assert [type(m).__name__ for m in mlp(6, 5, 4, norm="none")] == ["Linear", "Identity", "ReLU", "Linear"]
