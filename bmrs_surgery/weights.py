"""Pretrained weights from local caches only: nothing is ever downloaded.

* ``torchvision:NAME --weights DEFAULT`` or ``--weights IMAGENET1K_V1`` (an enum member's name, or
  ``ResNet18_Weights.IMAGENET1K_V1``): the file torchvision would download, looked up in
  ``$TORCH_HOME/hub/checkpoints`` (``torch.hub.get_dir()``), read with ``weights_only=True``.
* ``timm:NAME --pretrained``: the model's weights in the Hugging Face cache (``$HF_HOME/hub``,
  ``model.safetensors`` or ``pytorch_model.bin`` of the model's ``hf_hub_id``), or, for a model
  without one, the file of its URL in ``$TORCH_HOME/hub/checkpoints``.
* ``--weights FILE``: a state dict (``.pt``/``.pth`` read with ``weights_only=True``, or
  ``.safetensors``) loaded into the named architecture (its classifier sized from the file).

A missing file is one line naming the file expected and the folder looked in. The result says which
weights were used (:class:`WeightsInfo`, recorded in the report) and the mean and standard
deviation the weights were trained with (for image folders).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

from .errors import JobError, ModelLoadError, file_problem
from .loading import LoadedModel

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


@dataclass
class WeightsInfo:
    """Which weights a job's network has, for the report."""

    source: str  # "initial" (the file or architecture as given), "torchvision", "timm" or "file"
    name: str | None = None  # the enum member or hub id
    file: str | None = None
    sha256: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def normalisation(self):
        return (self.mean, self.std) if self.mean and self.std else None


def validate_job(job) -> None:
    """``--weights`` needs a named architecture, ``--pretrained`` a ``timm:NAME`` model."""
    if job.weights is not None and (not isinstance(job.weights, str) or not job.weights.strip()):
        raise JobError(f"must be DEFAULT, a weights name or a file, got {job.weights!r}", param="weights")
    if job.weights and job.pretrained:
        raise JobError("give --weights or --pretrained, not both", param="pretrained")
    if job.pretrained and not job.model.startswith("timm:"):
        raise JobError(f"is for timm:NAME models (the model is {job.model}); for torchvision use --weights DEFAULT",
                       param="pretrained")
    if job.weights and not _is_file_spec(job.weights) and not job.model.startswith("torchvision:"):
        raise JobError(f"{job.weights} names torchvision weights, for torchvision:NAME models only "
                       "(for a state-dict file give its path)", param="weights")
    if job.weights and _is_file_spec(job.weights) and ("/" in job.model or Path(job.model).suffix):
        raise JobError("loads a state dict into a named architecture (torchvision:NAME, timm:NAME or a bundled "
                       f"name), not into the model file {job.model}", param="weights")


def _is_file_spec(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.lower().endswith(WEIGHT_SUFFIXES)


def load_for_job(job) -> tuple[LoadedModel, WeightsInfo]:
    """The job's network with the weights it asks for (see the module doc)."""
    from . import loading

    if job.pretrained:
        return timm_pretrained(job.model.split(":", 1)[1])
    if job.weights and _is_file_spec(job.weights):
        return from_file(job.model, Path(job.weights).expanduser())
    if job.weights:
        return torchvision_weights(job.model.split(":", 1)[1], job.weights.strip())
    loaded = loading.load_model(job.model, arch=job.arch, trust=job.trust_model)
    return loaded, WeightsInfo("initial", file=job.model if Path(job.model).is_file() else None)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_state(path: Path, what: str) -> dict:
    """A state dict from ``path`` without running code from it."""
    problem = file_problem(path, missing="not found")
    if problem:
        raise ModelLoadError(f"weights file {path} {problem}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure is the file's
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ModelLoadError(f"cannot read {what} {path} ({reason})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint wrapping its weights
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{what} {path} holds no state dict (a mapping of names to tensors)")
    from .limits import check_state_shapes

    check_state_shapes(state, str(path))
    return state


# ------------------------------------------------------------------------------------------------
# torchvision
# ------------------------------------------------------------------------------------------------


def _weights_enum(name: str, spec: str):
    import torchvision

    if name not in torchvision.models.list_models():
        raise ModelLoadError(f"unknown torchvision model {name!r}")
    enum = torchvision.models.get_model_weights(name)
    members = list(enum)
    member = spec.rsplit(".", 1)[-1]
    if member.upper() == "DEFAULT":
        return enum.DEFAULT
    for w in members:
        if w.name == member:
            return w
    raise JobError(f"{spec} is not a weights name of torchvision:{name} (choose DEFAULT, "
                   f"{', '.join(w.name for w in members)})", param="weights")


def torchvision_file(w) -> Path:
    """Where torchvision keeps (and this toolkit looks for) the file of weights ``w``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(w.url).path)


@contextlib.contextmanager
def _state_from(state: dict):
    """torchvision builds the network for its weights (classes and other arguments the weights
    fix) and then asks the weights for their state dict: that one answer comes from ``state``, read
    here with ``weights_only=True`` (torch.hub's own loading unpickles freely, and may download)."""
    from torchvision.models._api import WeightsEnum

    original = WeightsEnum.get_state_dict
    WeightsEnum.get_state_dict = lambda self, *a, **k: state
    try:
        yield
    finally:
        WeightsEnum.get_state_dict = original


def torchvision_weights(name: str, spec: str) -> tuple[LoadedModel, WeightsInfo]:
    import torchvision

    w = _weights_enum(name, spec)
    path = torchvision_file(w)
    if not path.is_file():
        raise ModelLoadError(f"{type(w).__name__}.{w.name} needs the file {path.name} in {path.parent} "
                             f"(set by TORCH_HOME); nothing is downloaded: copy it there from {w.url}")
    state = _read_state(path, f"{type(w).__name__}.{w.name}")
    try:
        with _state_from(state):
            net = torchvision.models.get_model(name, weights=w)
    except (RuntimeError, KeyError, ValueError) as exc:
        from .loading import _state_dict_problem

        raise ModelLoadError(f"{path} does not match torchvision:{name}: {_state_dict_problem(exc)}") from None
    tf = w.transforms() if callable(getattr(w, "transforms", None)) else None
    mean, std = getattr(tf, "mean", None), getattr(tf, "std", None)
    crop = getattr(tf, "crop_size", None)
    shape = (3, int(crop[0]), int(crop[0])) if crop else (3, 224, 224)
    info = WeightsInfo("torchvision", f"{type(w).__name__}.{w.name}", str(path), _sha256(path),
                       list(mean) if mean else None, list(std) if std else None)
    return LoadedModel(net, f"torchvision:{name}", shape), info


# ------------------------------------------------------------------------------------------------
# timm
# ------------------------------------------------------------------------------------------------


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment says now (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def timm_file(cfg: dict) -> tuple[Path | None, str]:
    """(the cached file of a timm pretrained config, or None; where it was looked for)."""
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        cache = hf_cache_dir()
        for fname in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(hub_id, fname, cache_dir=cache)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found), ""
        folder = cache / ("models--" + hub_id.replace("/", "--"))
        return None, f"model.safetensors (or pytorch_model.bin) of {hub_id} in {folder} (set by HF_HOME)"
    url = cfg.get("url")
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        return (path, "") if path.is_file() else (None, f"{path.name} in {path.parent} (set by TORCH_HOME)")
    return None, "no pretrained file is known for it"


def timm_pretrained(name: str) -> tuple[LoadedModel, WeightsInfo]:
    try:
        import timm
    except ImportError:
        raise ModelLoadError("timm:NAME needs timm: pip install 'bmrs-surgery[timm]'") from None
    if name not in timm.list_models(pretrained=True) and name not in timm.list_models():
        raise ModelLoadError(f"unknown timm model {name!r}")
    try:
        net = timm.create_model(name, pretrained=False)
    except Exception as exc:  # noqa: BLE001 - timm raises many kinds for a bad name or config
        raise ModelLoadError(f"timm model {name!r}: {(str(exc).splitlines() or [''])[0]}") from None
    cfg = dict(getattr(net, "pretrained_cfg", None) or {})
    path, where = timm_file(cfg)
    if path is None:
        raise ModelLoadError(f"timm:{name} --pretrained needs {where}; nothing is downloaded")
    from .loading import _load_state

    _load_state(net, _read_state(path, f"timm:{name} weights"), str(path))
    size = cfg.get("input_size") or (3, 224, 224)
    info = WeightsInfo("timm", cfg.get("hf_hub_id") or cfg.get("url"), str(path), _sha256(path),
                       list(cfg["mean"]) if cfg.get("mean") else None, list(cfg["std"]) if cfg.get("std") else None)
    return LoadedModel(net, f"timm:{name}", tuple(int(d) for d in size)), info


# ------------------------------------------------------------------------------------------------
# A user's state dict
# ------------------------------------------------------------------------------------------------


def from_file(arch: str, path: Path) -> tuple[LoadedModel, WeightsInfo]:
    """A state dict in ``path`` loaded into architecture ``arch`` (classes from the file)."""
    from .loading import _arch_for_state, _load_state

    state = _read_state(path, "weights file")
    net, shape = _arch_for_state(arch, state)
    _load_state(net, state, str(path))
    mean = std = None
    if arch.startswith("torchvision:"):  # a torchvision architecture: its weights' normalisation
        import torchvision

        try:
            tf = torchvision.models.get_model_weights(arch.split(":", 1)[1]).DEFAULT.transforms()
            mean, std = list(tf.mean), list(tf.std)
        except (AttributeError, ValueError, KeyError):
            pass
    return LoadedModel(net, arch, shape), WeightsInfo("file", path.name, str(path), _sha256(path), mean, std)
