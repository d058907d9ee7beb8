"""Backbone registry: image (B, C, H, W) -> features (B, out_dim).

Every builder takes `in_channels`, `image_size` and `norm` ("batch" or "none") and returns a module
with an `out_dim` attribute. SyncBN is applied to a whole method afterwards (see models.base).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from utils.registry import Registry

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")


def norm2d(norm: str) -> Callable[[int], nn.Module]:
    if norm == "none":
        return lambda channels: nn.Identity()
    return nn.BatchNorm2d


def norm1d(norm: str, features: int) -> nn.Module:
    return nn.Identity() if norm == "none" else nn.BatchNorm1d(features)


class ResNetTrunk(nn.Module):
    """torchvision's ResNet without its classifier; `cifar_stem` swaps the 7x7/2 conv and the
    max-pool for a 3x3/1 conv (32 px images keep their resolution into layer1)."""

    def __init__(self, depth: int, *, in_channels: int, norm: str, cifar_stem: bool):
        # Imported here, not with the module: importing torchvision imports torch._dynamo (2.5 s a process
        # on a 2-core CPU), which a run without a ResNet or per-sample transforms never needs.
        from torchvision.models import resnet

        super().__init__()
        builders = {18: resnet.resnet18, 34: resnet.resnet34, 50: resnet.resnet50}
        net = builders[depth](weights=None, norm_layer=norm2d(norm))
        if cifar_stem:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.out_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _register_resnets() -> None:
    for depth in (18, 34, 50):
        for cifar_stem, suffix in ((True, "_cifar"), (False, "")):
            def build(*, in_channels: int, image_size: int, norm: str = "batch",
                      _depth=depth, _cifar=cifar_stem) -> nn.Module:
                return ResNetTrunk(_depth, in_channels=in_channels, norm=norm, cifar_stem=_cifar)
            BACKBONES.register(f"resnet{depth}{suffix}")(build)


_register_resnets()


class SmallCNN(nn.Module):
    """A small VGG-style CNN for MNIST-sized images and CPU runs.

    Three stages of `convs_per_stage` 3x3 convolutions and a 2x2 max-pool (28 -> 14 -> 7 -> 3); the
    last 3x3 map is flattened rather than global-average-pooled: on the MNIST digits, pooling away where a
    stroke is cost about 12 points of k-means ACC (0.66 vs 0.78) in our measurements. A linear
    layer then maps the flattened map to `out_dim`.
    """

    def __init__(self, *, in_channels: int, image_size: int, norm: str = "batch",
                 widths: tuple[int, ...] = (32, 64, 128), convs_per_stage: int = 1, out_dim: int = 512):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        size = image_size
        for width in widths:
            for _ in range(convs_per_stage):
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=norm == "none"),
                           norm2d(norm)(width), nn.ReLU(inplace=True)]
                channels = width
            layers.append(nn.MaxPool2d(2))
            size //= 2
        if size < 1:
            raise ValueError(f"small_cnn: image_size {image_size} is too small for three 2x poolings")
        self.features = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, out_dim, bias=norm == "none"),
                                norm1d(norm, out_dim), nn.ReLU(inplace=True))
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@BACKBONES.register("small_cnn")
def small_cnn(*, in_channels: int, image_size: int, norm: str = "batch") -> nn.Module:
    """One convolution per stage: about 1,000 training images/s for two views on a 2-core CPU."""
    return SmallCNN(in_channels=in_channels, image_size=image_size, norm=norm, convs_per_stage=1)


@BACKBONES.register("small_cnn_deep")
def small_cnn_deep(*, in_channels: int, image_size: int, norm: str = "batch") -> nn.Module:
    """Two convolutions per stage: more capacity, about 5x the compute of small_cnn."""
    return SmallCNN(in_channels=in_channels, image_size=image_size, norm=norm, convs_per_stage=2)


class DCCMNet(nn.Module):
    """DCCM's CNN (Wu et al., ICCV 2019): four unpadded 3x3 conv-BN-ReLU layers of 64, 64, 128 and 256
    channels, a 2x2 max-pool after the second and third, then global average pooling: 256-d (at 32 px:
    30, 28, 14, 12, 6, 4, 1). Convolutions start from Kaiming-normal weights, as DCCM's.
    Batch norm never keeps running statistics (DCCM's `track_running_stats=False`): every pass, training
    or evaluation, normalises with its own batch. `forward_local` also returns the first pooled map
    (B, 64, 14, 14) at 32 px, the local features of DCCM's mutual-information term."""

    def __init__(self, *, in_channels: int, image_size: int, norm: str = "batch"):
        super().__init__()
        if image_size < 20:
            raise ValueError(f"dccm_cnn: image_size {image_size} is too small (at least 20 px)")

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            conv = nn.Conv2d(c_in, c_out, 3, bias=norm == "none")
            nn.init.kaiming_normal_(conv.weight)
            bn = (nn.Identity() if norm == "none" else nn.BatchNorm2d(c_out, track_running_stats=False))
            return [conv, bn, nn.ReLU(inplace=True)]

        self.local = nn.Sequential(*block(in_channels, 64), *block(64, 64), nn.MaxPool2d(2))
        self.rest = nn.Sequential(*block(64, 128), nn.MaxPool2d(2), *block(128, 256),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.local_channels = 64
        self.out_dim = 256

    def forward_local(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> (features (B, 256), first pooled map (B, 64, H', W'))."""
        local = self.local(x)
        return self.rest(local), local

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_local(x)[0]


@BACKBONES.register("dccm_cnn")
def dccm_cnn(*, in_channels: int, image_size: int, norm: str = "batch") -> nn.Module:
    return DCCMNet(in_channels=in_channels, image_size=image_size, norm=norm)


def build_backbone(name: str, *, in_channels: int, image_size: int, norm: str) -> nn.Module:
    return BACKBONES.get(name)(in_channels=in_channels, image_size=image_size, norm=norm)


def mlp(in_dim: int, hidden_dim: int, out_dim: int, *, norm: str = "batch") -> nn.Sequential:
    """Linear -> BN -> ReLU -> Linear: the projector / predictor of BYOL, ProPos and friends."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), norm1d(norm, hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))
