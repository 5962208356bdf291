"""One compression job, described as plain data: what :func:`bmrs_surgery.compress` runs and
what ``bmrs-compress MODEL ...`` builds from its options. Every default comes from
:mod:`defaults`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from . import defaults
from .errors import JobError
from .fit import AUTO, FINETUNE_GATES, MODES, FitConfig
from .gated import KL_WEIGHTINGS
from .gates import NOISE_MODES
from .limits import check_seed, check_threads


@dataclass
class Job:
    """What to compress, on what data, how, and where the outputs go.

    ``model``: a bundled name (``lenet5``), ``torchvision:NAME`` or a model file; ``data``:
    ``fashion-mnist``, ``fashion-mnist-sample``, ``digits`` or an ``.npz`` file (with named ``inputs``:
    token arrays and ``labels``, see :mod:`tokens`; None for a model
    that already carries fitted gates); ``out``: the output folder (None: nothing written, the
    outputs are in the result; a folder holding an earlier run's outputs needs ``overwrite=True``).
    ``epochs=None`` means ``"auto"`` (fit until the gates settle, at most ``max_steps`` steps) for a
    model without fitted gates and 0 for one with them.
    """

    model: str
    data: str | None = None
    out: str | Path | None = None
    arch: str | None = None
    trust_model: bool = False
    prior: str = defaults.PRIOR
    precision_bits: int = defaults.PRECISION_BITS
    mode: str = defaults.MODE
    epochs: int | str | None = None  # or "auto": fit until the gates settle (at most max_steps steps)
    max_steps: int = defaults.MAX_STEPS
    max_minutes: float | None = None
    finetune_epochs: int = defaults.FINETUNE_EPOCHS
    prune_every: int = defaults.PRUNE_EVERY
    batch_size: int = defaults.BATCH_SIZE
    lr: float | None = None  # the weights' learning rate; None: defaults.LR, or DISTILL_LR on data without labels
    gate_lr: float = defaults.GATE_LR
    kl_weighting: str = defaults.KL_WEIGHTING
    noise: str = defaults.NOISE
    finetune_gates: str = defaults.FINETUNE_GATES
    seed: int = defaults.SEED
    device: str = defaults.DEVICE
    amp: bool = False
    sweep_levels: int = defaults.SWEEP_LEVELS
    round_to: int | str | None = defaults.ROUND_TO  # an integer, or "auto": widths by measured latency
    target: str | None = None  # csv:FILE: the class column
    image_size: int | None = None  # imagefolder:DIR: side of the square input (default: the model's)
    weights: str | None = None  # torchvision:NAME: DEFAULT, an enum name or a state-dict file
    pretrained: bool = False  # timm:NAME: the pretrained weights from the Hugging Face cache
    target_macs: float | None = None  # budgets: prune in dF order until the pruned/original ratio holds
    target_params: float | None = None
    target_latency: float | None = None  # milliseconds, ONNX Runtime CPU, at target_batch
    target_batch: int = defaults.LATENCY_TARGET_BATCH
    distill: bool = False  # fit and fine-tune against the original network's logits too
    lr_schedule: str = defaults.LR_SCHEDULE  # "constant" or "cosine" within each phase
    inputs: tuple[str, ...] = ()  # named inputs NAME:DTYPE:SHAPE (token .npz data, or a gated model): inputs.validate_job
    inputs_file: str | None = None  # or a safetensors file of named example inputs
    bench_batch_sizes: tuple[int, ...] = defaults.BENCH_BATCH_SIZES
    threads: int = defaults.THREADS
    resume: bool = False
    overwrite: bool = False  # replace the outputs of an earlier run in ``out`` (``resume`` allows it too)

    def validate(self) -> None:
        """Every option in range and the options consistent (a :class:`JobError` naming the option)."""
        choices = {"prior": ("normal", "uniform"), "mode": MODES, "kl_weighting": KL_WEIGHTINGS,
                   "noise": NOISE_MODES, "finetune_gates": FINETUNE_GATES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise JobError(f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}", param=name)
        if not isinstance(self.model, str) or not self.model:
            raise JobError("must name a model", param="model")
        ranges = {"precision_bits": (1, 22), "finetune_epochs": (0, None), "prune_every": (1, None),
                  "batch_size": (1, None), "sweep_levels": (0, 100)}
        for name, (lo, hi) in ranges.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
                span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
                raise JobError(f"must be an integer {span}, got {v!r}", param=name)
        check_seed(self.seed)  # the range torch, numpy and scikit-learn all take
        check_threads(self.threads)  # 0 (all cores) up to this machine's cores
        if self.epochs is not None and self.epochs != AUTO and (
                isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0):
            raise JobError(f"must be an integer >= 0 or {AUTO}, got {self.epochs!r}", param="epochs")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise JobError(f"must be an integer >= 1, got {self.max_steps!r}", param="max_steps")
        if self.max_minutes is not None and (isinstance(self.max_minutes, bool) or not isinstance(self.max_minutes, (int, float))
                                             or not math.isfinite(self.max_minutes) or self.max_minutes <= 0):
            raise JobError(f"must be a positive number of minutes, got {self.max_minutes!r}", param="max_minutes")
        if self.round_to is not None and self.round_to != "auto" and (
                isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1):
            raise JobError(f"must be a positive integer or auto, got {self.round_to!r}", param="round_to")
        from . import budget, inputs, weights

        budget.validate_job(self)
        weights.validate_job(self)
        inputs.validate_job(self)
        if self.image_size is not None and (isinstance(self.image_size, bool) or not isinstance(self.image_size, int)
                                            or not 8 <= self.image_size <= 4096):
            raise JobError(f"must be an integer 8..4096, got {self.image_size!r}", param="image_size")
        if self.target is not None and not str(self.data or "").startswith("csv:"):
            raise JobError("names the class column of csv:FILE data", param="target")
        if self.lr_schedule not in ("constant", "cosine"):
            raise JobError(f"must be constant or cosine, got {self.lr_schedule!r}", param="lr_schedule")
        if self.distill and self.data is None:
            raise JobError("distils while fitting: give data to fit on", param="distill")
        for name in ("lr", "gate_lr"):
            v = getattr(self, name)
            if v is None and name == "lr":
                continue
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise JobError(f"must be a finite positive number, got {v!r}", param=name)
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.bench_batch_sizes):
            raise JobError(f"must be positive integers, got {self.bench_batch_sizes!r}", param="bench_batch_sizes")
        if self.data is None:
            if self.epochs:
                raise JobError("needed to fit the gates" if self.epochs == AUTO else f"needed to fit {self.epochs} epoch(s)",
                               param="data")
            if self.sweep_levels:
                raise JobError("needed for a sweep", param="data")

    def fit_config(self, epochs: int | str) -> FitConfig:
        """The fitting part of the job (the fields it shares with :class:`FitConfig`)."""
        shared = {f.name: getattr(self, f.name) for f in fields(FitConfig) if f.name in JOB_FIELDS}
        return FitConfig(**{**shared, "epochs": epochs})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = None if self.out is None else str(self.out)
        d["bench_batch_sizes"] = list(self.bench_batch_sizes)
        d["inputs"] = list(self.inputs)
        return d




JOB_FIELDS = tuple(f.name for f in fields(Job))
