"""Architecture sources that never download anything: ``timm:NAME`` and torchvision by name.

* ``timm:NAME``: the architecture from timm (``pretrained=False``), with timm's own input size;
* ``torchvision:NAME``: every torchvision builder, classification, segmentation, video,
  detection and optical flow, built with ``weights=None`` *and* ``weights_backbone=None`` (the
  segmentation and detection builders otherwise fetch ImageNet backbone weights).

Each returns ``(network, input shape without the batch axis)``. An unknown name or a builder that
refuses its arguments is a one-line :class:`~bmrs_surgery.errors.ModelLoadError`.
"""

from __future__ import annotations

import inspect
import warnings

from torch import nn

from .errors import ModelLoadError
from .errors import first_line as _first_line

# one example per kind of torchvision model, without the batch axis
TORCHVISION_SHAPES = {
    "video": (3, 16, 112, 112),  # (channels, frames, height, width)
    "segmentation": (3, 224, 224),
    "detection": (3, 320, 320),
    "optical_flow": (3, 128, 128),  # one frame; RAFT takes two
}


def torchvision_kind(name: str) -> str:
    """classification, segmentation, video, detection, optical_flow or quantization."""
    from torchvision import models

    for kind in ("segmentation", "video", "detection", "optical_flow", "quantization"):
        if name in models.list_models(module=getattr(models, kind)):
            return kind
    return "classification"


def torchvision_model(name: str, num_classes: int | None = None) -> tuple[nn.Module, tuple[int, ...]]:
    """A torchvision architecture by name, random weights, nothing downloaded."""
    from torchvision import models

    if name not in models.list_models():
        raise ModelLoadError(f"unknown torchvision model {name!r}")
    builder = models.get_model_builder(name)
    params = inspect.signature(builder).parameters
    kwargs: dict = {"weights": None}
    if "weights_backbone" in params:
        kwargs["weights_backbone"] = None
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = builder(**kwargs)
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise ModelLoadError(f"torchvision model {name!r}: {_first_line(exc)}") from None
    kind = torchvision_kind(name)
    shape = TORCHVISION_SHAPES.get(kind, (3, 224, 224))
    if name == "inception_v3":
        shape = (3, 299, 299)
    elif name.startswith("mvit") or name == "s3d":  # 16 x 224 x 224 clips (fixed, or pooled to 7 x 7)
        shape = (3, 16, 224, 224)
    return net, shape


def timm_model(name: str, num_classes: int | None = None) -> tuple[nn.Module, tuple[int, ...]]:
    """A timm architecture by name (random weights; timm is never asked to download)."""
    try:
        import timm
    except ImportError:
        raise ModelLoadError("timm:NAME needs timm (pip install 'bmrs-surgery[timm]')") from None
    if not timm.is_model(name):
        raise ModelLoadError(f"unknown timm model {name!r} (timm.list_models() lists them)")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = timm.create_model(name, pretrained=False, **kwargs)
    except (ValueError, TypeError, RuntimeError, AssertionError) as exc:
        raise ModelLoadError(f"timm model {name!r}: {_first_line(exc)}") from None
    cfg = getattr(net, "pretrained_cfg", None) or {}
    return net, tuple(cfg.get("input_size", (3, 224, 224)))


def timm_families() -> dict[str, list[str]]:
    """timm's model names by family (the module that defines them), as timm lists them now."""
    import timm

    families = {}
    for module in timm.list_modules():
        names = timm.list_models(module=module)
        if names:
            families[module] = names
    return families


def yolo_model(config: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A YOLO detector from one of ultralytics' model YAMLs (``yolov8n.yaml``, ``yolo11n.yaml``):
    the architecture only, random weights; needs ultralytics installed."""
    try:
        from ultralytics.nn.tasks import DetectionModel
    except ImportError:
        raise ModelLoadError("yolo:CONFIG needs ultralytics (pip install ultralytics)") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = DetectionModel(config, verbose=False)
    except (FileNotFoundError, ValueError, KeyError, AssertionError) as exc:
        raise ModelLoadError(f"YOLO config {config!r}: {_first_line(exc)}") from None
    return YoloNetwork(net).eval(), (3, 320, 320)


class YoloNetwork(nn.Module):
    """An ultralytics ``DetectionModel`` called on one image batch: its ``forward(x, *args, **kwargs)``
    (a training dict or options) cannot be traced, its layer loop can. The ``Detect`` head's
    anchor cache depends on the input's shape, so it is traced as one opaque call (its inputs,
    the three feature maps, keep their channels)."""

    def __init__(self, detection_model: nn.Module):
        super().__init__()
        self.net = detection_model
        for m in detection_model.modules():  # C2f/C3k2: the same sum with split() instead of list(chunk())
            if hasattr(type(m), "forward_split"):
                m.forward = m.forward_split

    def forward(self, x):
        return self.net._predict_once(x)
