"""timm's own versions of torch layers that compute what the torch layer computes: ``Linear`` (an
``nn.Linear`` whose forward calls ``F.linear`` with its own weight, for TorchScript) and
``Conv2dSame``/``Conv2dSameExport`` (an ``nn.Conv2d`` that pads like TensorFlow's "SAME" first).
With their own ``forward`` they would be traced through, and a functional call cannot hold a gate,
so the channels they read (every timm classifier's input features) would be kept. Registered with
the torch layer's rule, they are one call each, a gate sits at their input and ``fold``/``resize``
act on their weight like the torch layer's; their forward (the padding) runs unchanged.

Registered only once timm is imported (by the model being traced): importing timm just for this
would cost every run a second or more. :func:`register_loaded` is called before each trace.
"""

from __future__ import annotations

import sys

from ..registry import module_rules, register_module
from .layers import ConvRule, LinearRule

_DONE = False

# (module path, class name, rule): each a torch layer with the same arithmetic
LAYERS = (
    ("timm.layers.linear", "Linear", LinearRule),
    ("timm.layers.conv2d_same", "Conv2dSame", ConvRule),
    ("timm.layers.conv2d_same", "Conv2dSameExport", ConvRule),
)


def register_loaded() -> None:
    """Register the rules for timm's layers, if timm has been imported (once)."""
    global _DONE
    if _DONE or "timm" not in sys.modules:
        return
    registered = module_rules()
    for module_path, name, rule in LAYERS:
        module = sys.modules.get(module_path)
        if module is None:
            try:
                __import__(module_path)
            except ImportError:
                continue
            module = sys.modules[module_path]
        cls = getattr(module, name, None)
        if cls is not None and cls not in registered:
            register_module(cls)(rule)
    _DONE = True
