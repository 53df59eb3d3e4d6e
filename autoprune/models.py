"""Dense architectures of the built-in tasks.

The CIFAR models follow the ones AMC (He et al., ECCV 2018) pruned: ResNet-20/56 and Plain-20 of
He et al. (2016), with 1x1-convolution projection shortcuts where a block changes shape, VGG-16
with BatchNorm, and torchvision's MobileNetV2 adapted to 32x32 inputs. Every ReLU is its own
module so that Torch-Pruning's operation counter sees each call.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "DigitsCNN",
    "FashionCNN",
    "CifarResNet",
    "PlainNet",
    "cifar_resnet",
    "plain_net",
    "vgg16_bn",
    "mobilenet_v2_cifar",
]


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class DigitsCNN(nn.Module):
    """A small CNN for scikit-learn's 8x8 digits: input (N, 1, 8, 8), output (N, 10) logits."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu2 = nn.ReLU(inplace=True)
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(128)
        self.relu3 = nn.ReLU(inplace=True)
        self.pool3 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(128 * 2 * 2, 128)
        self.relu4 = nn.ReLU(inplace=True)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        x = self.pool3(self.relu3(self.bn3(self.conv3(x))))
        x = self.relu4(self.fc1(torch.flatten(x, 1)))
        return self.fc(x)


class FashionCNN(nn.Module):
    """A four-layer CNN for 28x28 Fashion-MNIST: input (N, 1, 28, 28), output (N, 10) logits."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(1, 32),
            *_conv_bn_relu(32, 64),
            nn.MaxPool2d(2),
            *_conv_bn_relu(64, 128),
            nn.MaxPool2d(2),
            *_conv_bn_relu(128, 256),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if residual and (stride != 1 or cin != cout):
            # Projection shortcut (option B of He et al.): a learned 1x1 conv, so the residual
            # channels of each stage form one prunable group instead of zero-padded identities.
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + self.shortcut(x)
        return self.relu2(out)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) of He et al. (2016) for 32x32 (or 28x28) images.

    Input (N, in_channels, H, W); output (N, num_classes) logits. Stages of 16, 32 and 64 channels.
    With ``residual=False`` it is the matching plain network (AMC's Plain-20).
    """

    def __init__(
        self, depth: int = 20, *, num_classes: int = 10, in_channels: int = 3, residual: bool = True
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        cin = 16
        for stage, (cout, stride) in enumerate([(16, 1), (32, 2), (64, 2)], start=1):
            blocks = []
            for i in range(n):
                blocks.append(_BasicBlock(cin, cout, stride if i == 0 else 1, residual))
                cin = cout
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


PlainNet = CifarResNet


def cifar_resnet(depth: int, *, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20/32/44/56/110 for CIFAR-sized inputs."""
    return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels, residual=True)


def plain_net(depth: int, *, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """The plain (no shortcut) counterpart of :func:`cifar_resnet`, as in AMC's Plain-20."""
    return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels, residual=False)


class _VGG(nn.Module):
    def __init__(self, features: nn.Sequential, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg16_bn(*, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """VGG-16 with BatchNorm for 32x32 inputs: 13 conv layers, one linear classifier."""
    cfg: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                            512, 512, 512, "M", 512, 512, 512, "M"]  # fmt: skip
    layers: list[nn.Module] = []
    cin = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            assert isinstance(v, int)
            layers += _conv_bn_relu(cin, v)
            cin = v
    return _VGG(nn.Sequential(*layers), num_classes)


def mobilenet_v2_cifar(*, num_classes: int = 10) -> nn.Module:
    """torchvision's MobileNetV2 with the two early stride-2 layers set to stride 1.

    ImageNet's stem downsamples 32x32 inputs to 1x1 before the last stage; keeping the first two
    strides at 1 leaves a 4x4 map there, the usual CIFAR adaptation.
    """
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2(weights=None, num_classes=num_classes)
    model.features[0][0].stride = (1, 1)
    model.features[2].conv[1][0].stride = (1, 1)
    return model
