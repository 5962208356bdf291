"""Reference architectures, by name: ``get_model("lenet5")``, ``list_models()``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from .blocks import dense_block, depthwise_separable, resnet_block, shuffle_block, transformer_block
from .paper import lenet5, mlp, resnet18_1ch

_HERE = Path(__file__).resolve().parent


def lenet5_fmnist(**kwargs) -> nn.Module:
    """LeNet5 trained on Fashion-MNIST (benchmarks/train_bundled.py), shipped with the package."""
    import torch

    model = lenet5(**kwargs)
    ck = torch.load(_HERE / "lenet5_fmnist.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(ck["state_dict"])
    return model.eval()

_REGISTRY: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...], str]] = {
    "mlp": (mlp, (1, 32, 32), "paper MLP for 32x32 inputs: 1024-150-150-10, Tanh"),
    "lenet5": (lenet5, (1, 32, 32), "paper LeNet5 for 32x32 single-channel inputs"),
    "lenet5-fmnist": (lenet5_fmnist, (1, 32, 32), "paper LeNet5 trained on Fashion-MNIST (bundled weights)"),
    "resnet18-1ch": (resnet18_1ch, (1, 32, 32), "torchvision ResNet-18 for 32x32 single-channel inputs (3x3 stem)"),
    "resnet_block": (resnet_block, (3, 16, 16), "ResNet basic blocks, one with a downsample shortcut"),
    "dense_block": (dense_block, (3, 16, 16), "DenseNet-style concatenation and transition"),
    "depthwise_separable": (depthwise_separable, (3, 16, 16), "depthwise-separable, inverted residual, grouped conv"),
    "shuffle_block": (shuffle_block, (3, 16, 16), "ShuffleNetV2 units: channel split, concat, shuffle"),
    "transformer_block": (transformer_block, (3, 16, 16), "ViT blocks: written-out and nn.MultiheadAttention"),
}


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def describe(name: str) -> str:
    return _REGISTRY[name][2]


def input_shape(name: str) -> tuple[int, ...]:
    """Shape of one example (without the batch axis) that the named model expects."""
    return _REGISTRY[name][1]


def get_model(name: str, **kwargs) -> nn.Module:
    """A freshly initialised reference model; raises KeyError listing the known names."""
    try:
        factory = _REGISTRY[name][0]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; bundled models: {', '.join(list_models())}") from None
    return factory(**kwargs)
