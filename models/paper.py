"""The paper's reference networks for 32x32 single-channel inputs (docs/results.md, "Fashion-MNIST: the paper's comparison")."""

from __future__ import annotations

from torch import nn


def mlp(num_classes: int = 10, in_features: int = 1024, hidden: int = 150) -> nn.Sequential:
    """Paper MLP: Linear(1024,150)-Tanh, Linear(150,150)-Tanh, Linear(150,10)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, num_classes),
    )


def lenet5(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """Paper LeNet5: Conv(1,6,5)-ReLU-MaxPool, Conv(6,16,5)-ReLU-MaxPool, 400-120-84-10 MLP."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


def resnet18_1ch(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 adapted to 32x32 single-channel inputs (Fashion-MNIST): a 3x3
    stride-1 stem on one channel instead of 7x7 stride 2 on three, the max-pool kept, so layer1
    works at 16x16 and the last stage at 2x2."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    return model
