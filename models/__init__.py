"""Reference architectures, by name: ``get_model("lenet5")``, ``list_models()``."""

from __future__ import annotations

from typing import Callable

from torch import nn

from .paper import lenet5, mlp

_REGISTRY: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...], str]] = {
    "mlp": (mlp, (1, 32, 32), "paper MLP for 32x32 inputs: 1024-150-150-10, Tanh"),
    "lenet5": (lenet5, (1, 32, 32), "paper LeNet5 for 32x32 single-channel inputs"),
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
